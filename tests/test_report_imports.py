"""The report package's layout: no import cycle between its modules (lazy imports inside functions count), and
the runs file modules stay cheap enough for ``zeroest claims`` (no estimator, numpy or torch)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import zeroest.report

PACKAGE = Path(zeroest.report.__file__).parent


def _report_imports(path: Path) -> set[str]:
    """Modules of zeroest.report that ``path`` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n.split(".")[2] for n in names
                  if n.startswith("zeroest.report.") and (PACKAGE / f"{n.split('.')[2]}.py").is_file()}
    return found - {path.stem}


def test_no_import_cycle_between_report_modules():
    graph = {p.stem: _report_imports(p) for p in PACKAGE.glob("*.py")}
    assert graph["analysis"] >= {"load", "join", "fit"}  # the parser sees imports at all
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, "import cycle: " + " -> ".join((*path, module))
        if module in done:
            return
        for child in sorted(graph[module]):
            visit(child, (*path, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())


def test_reading_runs_loads_no_estimator_numpy_or_torch():
    code = ("import sys, zeroest.report.load, zeroest.report.runs; "
            "print(sorted(m for m in ('numpy', 'torch', 'zeroest.estimator') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"

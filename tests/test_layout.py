"""The source layout: no import cycles, small files, and a core that imports no torch.

The cycle check parses every module of ``estimator/``, ``validate/`` and ``zeroest/`` and follows every import
of another of them, at the top or inside a function (a lazy import still ties the two modules together);
``from package import name`` counts as an import of ``package.name`` when that is a module. Importing a
module's parent packages is not counted (Python runs their ``__init__`` first whoever imports what).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"estimator": "zeroest.estimator", "validate": "zeroest.validate", "zeroest": "zeroest"}
"""Source folder -> the package it installs as (pyproject.toml ``package-dir``)."""
MAX_LINES = 400
"""House style: a file owns one idea and stays under ~400 lines."""
HEAVY = ("torch", "deepspeed", "transformers")
"""Imported only on the paths that run a model, never by the estimator's import."""


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the three folders (packages by their __init__)."""
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def _imported(node: ast.AST, module: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    """The dotted names one import statement brings in, relative imports resolved."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        parts = module.split(".")
        parts = parts[: len(parts) - node.level + (1 if is_package else 0)]
        base = ".".join([*parts, base] if base else parts)
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its file (top level, functions, TYPE_CHECKING)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            for name in _imported(node, module, path.name == "__init__.py", modules):
                while name and name not in modules:  # an attribute of a module: the module
                    name = name.rpartition(".")[0]
                if name and name != module:
                    edges.add(name)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_cycle_finder_finds_a_lazy_cycle():
    """The finder itself: a -> b -> c -> a is one cycle, d hanging off it is not in it."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "zeroest.estimator.trace.tracer" in graph["zeroest.estimator.core.activations"]  # inside a function
    assert "zeroest.estimator.core.profile" in graph["zeroest.estimator.trace.polys"]
    assert len(graph) > 50


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_trace_depends_only_on_the_value_modules_of_core():
    """The tracer reads the profile type, the shape and the shape's HF config, and feeds its trace to the request
    sequence (``core.requests``, ``core.zero0_requests``, ``core.zero3_requests`` and their types, over
    ``core.allocator``: builders of requests, no formula); it never reaches the formulas or the dispatch (which
    import it lazily)."""
    graph = import_graph()
    allowed = {"zeroest.estimator.core.profile", "zeroest.estimator.core.shape", "zeroest.estimator.core.hf_config",
               "zeroest.estimator.core.requests", "zeroest.estimator.core.zero0_requests",
               "zeroest.estimator.core.zero3_requests",
               "zeroest.estimator.core.request_types", "zeroest.estimator.core.allocator"}
    for module, edges in graph.items():
        if module.startswith("zeroest.estimator.trace"):
            outside = {e for e in edges if not e.startswith("zeroest.estimator.trace")}
            assert outside <= allowed, (module, outside - allowed)
    assert not any(e.startswith("zeroest.estimator") for e in graph["zeroest.estimator.core.profile"])


@pytest.mark.parametrize("folder", list(PACKAGES))
def test_source_files_stay_under_the_line_limit(folder):
    long = {p.relative_to(ROOT).as_posix(): n for p in sorted((ROOT / folder).rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


_CHILD = """
import importlib, json, pkgutil, sys
import zeroest.estimator
import zeroest.estimator.core as core
names = [m.name for m in pkgutil.iter_modules(core.__path__, core.__name__ + ".")]
for name in names:
    importlib.import_module(name)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy})
print(json.dumps({{"modules": names, "heavy": heavy}}))
"""


def test_estimator_core_imports_no_torch():
    """In a fresh interpreter, ``zeroest.estimator`` and every module of its core import none of torch,
    deepspeed or transformers."""
    code = _CHILD.format(heavy=repr(set(HEAVY)))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "zeroest.estimator.core.activations" in result["modules"]
    assert "zeroest.estimator.core.closed_form" in result["modules"]
    assert result["heavy"] == []

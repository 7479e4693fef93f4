"""Where does ``zeroest validate`` spend its time? Planning a grid, and one CPU validation end to end.

Prints (1) the wall time of planning the default grid (setup checks, ds_configs and one ``estimate()`` per
run) and (2) the wall time of ``validate --cpu --grid quick`` in a fresh output folder, with each run's wall
time split into imports, model build, ``deepspeed.initialize``, steps and the rest (process start-up,
launcher). On the GPU the same split is in each row of runs.jsonl (``measured.import_s``,
``measured.phases.*.time_s``, ``wall_s``). Run: ``python benchmarks/bench_validate.py``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path


def bench_plan(grid_name: str) -> None:
    from zeroest.validate.grid import apply_overrides, load_grid
    from zeroest.validate.runner import ValidateOptions, plan

    grid = load_grid(grid_name)
    with tempfile.TemporaryDirectory() as folder:
        opts = ValidateOptions(out=Path(folder), cpu=True)
        start = time.perf_counter()
        runs = plan(apply_overrides(grid, [], []), grid.models, opts, visible_gpus=0)
        elapsed = time.perf_counter() - start
    predicted = sum(run.prediction is not None for run in runs)
    print(
        f"plan --grid {grid_name}: {len(runs)} runs ({predicted} predicted) in {elapsed:.2f} s "
        f"({1000 * elapsed / len(runs):.0f} ms a run)"
    )


def bench_cpu_quick() -> None:
    from zeroest.report.runs import read_rows

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "out"
        cmd = [sys.executable, "-m", "zeroest.validate", "--cpu", "--grid", "quick", "--out", str(out)]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        if done.returncode != 0:
            print(done.stderr[-2000:])
            raise SystemExit(done.returncode)
        rows = [row for row in read_rows(out / "runs.jsonl") if row["rank"] == 0]
    print(f"validate --cpu --grid quick: {len(rows)} runs in {elapsed:.1f} s")
    for row in rows:
        measured = row["measured"]
        phases = measured["phases"]
        build, init = phases["build"]["time_s"], phases["init"]["time_s"]
        steps = sum(p["time_s"] for name, p in phases.items() if name.startswith("step"))
        imports = measured.get("import_s") or 0.0
        rest = row["wall_s"] - imports - build - init - steps
        print(
            f"  stage {row['setup']['stage']} simulated={row['simulated']}: wall {row['wall_s']:.1f} s = "
            f"imports {imports:.1f} + build {build:.1f} + init {init:.1f} + steps {steps:.1f} "
            f"+ start-up/launcher {rest:.1f}"
        )


if __name__ == "__main__":
    bench_plan("default")
    bench_plan("zeroinit")
    bench_cpu_quick()

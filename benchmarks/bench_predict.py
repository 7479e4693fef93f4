"""How fast is a prediction? Prints the wall time of the CLI and of ``estimate()``.

Targets (issue 2): ``zeroest predict --params 1.3B --gpus 2`` in at most 0.3 s wall (no torch import on that path),
``zeroest.estimate()`` under 1 ms. Run: ``python benchmarks/bench_predict.py``.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time


def cli_wall_s(runs: int = 5) -> float:
    cmd = [sys.executable, "-m", "zeroest", "predict", "--params", "1.3B", "--gpus", "2"]
    subprocess.run(cmd, check=True, capture_output=True)  # warm the file cache
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def torch_imported_by_cli() -> bool:
    code = ("import sys; from typer.testing import CliRunner; from zeroest.cli import app; "
            "CliRunner().invoke(app, ['predict', '--params', '1.3B', '--gpus', '2']); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return out.stdout.strip() == "True"


def estimate_s(repeats: int = 2000) -> float:
    from zeroest.estimator.core.setup import Workload

    from zeroest import Parallelism, TrainingSetup, ZeroConfig, estimate, standard_shape

    shape = standard_shape(1_300_000_000)
    setups = [TrainingSetup(model=shape, parallel=Parallelism(gpus_per_node=2), zero=ZeroConfig(stage=s),
                            workload=Workload(activations="closed-form")) for s in range(4)]
    estimate(setups[0])
    start = time.perf_counter()
    for i in range(repeats):
        estimate(setups[i % 4])
    return (time.perf_counter() - start) / repeats


if __name__ == "__main__":
    print(f"zeroest predict --params 1.3B --gpus 2: {cli_wall_s():.3f} s wall (median of 5; target <= 0.3 s)")
    print(f"torch imported on that path: {torch_imported_by_cli()}")
    print(f"zeroest.estimate(): {estimate_s() * 1e3:.3f} ms per call (target < 1 ms)")

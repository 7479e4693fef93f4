"""Start-up time of ``zeroest predict`` against a bare ``python -c "import numpy, typer"``.

Each command runs ``RUNS`` times as a fresh process; the median wall time is printed, and their ratio (the
target is at most 1.5). Run: ``python benchmarks/bench_startup.py``.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

RUNS = 10
COMMANDS: dict[str, list[str]] = {
    "python -c 'import numpy, typer'": [sys.executable, "-c", "import numpy, typer"],
    "zeroest predict --params 1.3B --stage 3": [sys.executable, "-m", "zeroest", "predict", "--params", "1.3B",
                                                "--stage", "3"],
}


def median_s(command: list[str], runs: int = RUNS) -> float:
    """Median wall seconds of ``runs`` fresh processes (one warm-up run first, not counted)."""
    subprocess.run(command, capture_output=True, check=True)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    medians = {name: median_s(cmd) for name, cmd in COMMANDS.items()}
    for name, seconds in medians.items():
        print(f"{name}: {seconds * 1000:.0f} ms (median of {RUNS})")
    base, ours = medians.values()
    print(f"ratio: {ours / base:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()

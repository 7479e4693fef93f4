"""Start-up time of ``zeroest predict`` against a bare ``python -c "import numpy, typer"``.

The two commands run as fresh processes in pairs, one right after the other (the order alternates), ``RUNS`` pairs
after one warm-up pair. Each pair gives one ratio, ours over the bare import: pairing keeps a load spike from other
processes on the machine out of the ratio more often than two separate medians would. Printed: each command's median
wall time and the median of the pair ratios (the target is at most 1.5). Run:
``python benchmarks/bench_startup.py [RUNS]``.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

RUNS = 15
COMMANDS = {
    "python -c 'import numpy, typer'": [sys.executable, "-c", "import numpy, typer"],
    "zeroest predict --params 1.3B --gpus 2": [sys.executable, "-m", "zeroest", "predict", "--params", "1.3B",
                                               "--gpus", "2"],
}


def timed(command: list[str]) -> float:
    """Wall seconds of one fresh process running ``command``."""
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, check=True)
    return time.perf_counter() - start


def pairs(runs: int) -> list[tuple[float, float]]:
    """``runs`` (bare import, ours) wall-time pairs, after one warm-up pair not counted."""
    base, ours = COMMANDS.values()
    timed(base), timed(ours)
    result = []
    for i in range(runs):
        if i % 2:
            o, b = timed(ours), timed(base)
        else:
            b, o = timed(base), timed(ours)
        result.append((b, o))
    return result


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else RUNS
    measured = pairs(runs)
    for k, name in enumerate(COMMANDS):
        print(f"{name}: {statistics.median(pair[k] for pair in measured) * 1000:.0f} ms (median of {runs})")
    ratio = statistics.median(ours / base for base, ours in measured)
    print(f"ratio: {ratio:.2f} (median of {runs} paired ratios; target <= 1.5)")


if __name__ == "__main__":
    main()

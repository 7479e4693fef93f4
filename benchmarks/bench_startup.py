"""Start-up time of ``zeroest predict`` against a bare ``python -c "import numpy, typer"``.

The two commands run as fresh processes in pairs, one right after the other (the order alternates), ``RUNS`` pairs
after one warm-up pair. Each pair gives one ratio, ours over the bare import: pairing keeps a load spike from other
processes on the machine out of the ratio more often than two separate medians would. Printed: each command's median
wall time, the median of the pair ratios (the target is at most 1.5), and the ratio of the two fastest runs (the
least disturbed by load; numpy's import starts a thread per core and suffers most from a busy machine).

Bytecode: by default both commands start as the environment has them. Where ``PYTHONDONTWRITEBYTECODE`` is set (as
on this repository's CI machine) and zeroest is installed editable, zeroest's source is compiled on every start
while numpy's and typer's ``.pyc`` files came with their wheels: the harder case for us. ``--bytecode`` gives both
commands one private bytecode cache (``PYTHONPYCACHEPREFIX``, a temporary folder, filled by the warm-up pair), as a
regular ``pip install`` leaves them; it writes nothing beside the source.
Run: ``python benchmarks/bench_startup.py [RUNS] [--bytecode]``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

RUNS = 15
COMMANDS = {
    "python -c 'import numpy, typer'": [sys.executable, "-c", "import numpy, typer"],
    "zeroest predict --params 1.3B --gpus 2": [sys.executable, "-m", "zeroest", "predict", "--params", "1.3B",
                                               "--gpus", "2"],
}


def timed(command: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one fresh process running ``command``."""
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, check=True, env=env)
    return time.perf_counter() - start


def pairs(runs: int, env: dict[str, str]) -> list[tuple[float, float]]:
    """``runs`` (bare import, ours) wall-time pairs, after one warm-up pair not counted."""
    base, ours = COMMANDS.values()
    timed(base, env), timed(ours, env)
    result = []
    for i in range(runs):
        if i % 2:
            o, b = timed(ours, env), timed(base, env)
        else:
            b, o = timed(base, env), timed(ours, env)
        result.append((b, o))
    return result


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--bytecode"]
    runs = int(args[0]) if args else RUNS
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ)
        if "--bytecode" in sys.argv:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = cache
        measured = pairs(runs, env)
    print("bytecode:", "private cache" if "--bytecode" in sys.argv else
          f"as the environment has it (PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r})")
    for k, name in enumerate(COMMANDS):
        print(f"{name}: {statistics.median(pair[k] for pair in measured) * 1000:.0f} ms (median of {runs})")
    ratio = statistics.median(ours / base for base, ours in measured)
    fastest = min(ours for _, ours in measured) / min(base for base, _ in measured)
    print(f"ratio: {ratio:.2f} (median of {runs} paired ratios; target <= 1.5); fastest over fastest: {fastest:.2f}")


if __name__ == "__main__":
    main()

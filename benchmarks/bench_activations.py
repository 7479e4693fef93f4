"""Timing of the activation profiles: closed form per setup, a cold trace of a 70B config, one from cache.

Targets: closed form < 1 ms per setup; traced llama-2-70b profile < 10 s from a cold process (imports, model
build on meta, six traces); the same profile from the disk cache < 50 ms in a fresh process (no torch import).
Usage: ``python benchmarks/bench_activations.py``; prints the figures.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, "..", "data", "models")
_CHILD = """
import json, sys, time
start = time.perf_counter()
from zeroest.estimator.core.activations import activation_profile
from zeroest.estimator.core.architecture import shape_from_config
config = json.load(open(sys.argv[1]))
shape = shape_from_config(config, "llama-2-70b")
profile, source = activation_profile(shape, 1, 4096, "bf16", "sdpa", mode="traced", config=config)
elapsed = time.perf_counter() - start
print(json.dumps({"s": elapsed, "source": source, "torch_imported": "torch" in sys.modules,
                  "backward_peak_gib": profile.backward_peak_bytes(False) / 2**30}))
"""


def closed_form_per_setup() -> float:
    """Mean seconds per ``closed_form_profile`` call over every preset x attention x two shapes."""
    from zeroest.estimator.core.architecture import shape_from_config
    from zeroest.estimator.core.closed_form import closed_form_profile

    setups = []
    for path in sorted(glob.glob(os.path.join(MODELS, "*.json"))):
        config = json.load(open(path))
        shape = shape_from_config(config, os.path.basename(path)[:-5])
        setups += [(shape, b, s, attn, config)
                   for attn in ("sdpa", "eager", "flash") for b, s in ((1, 2048), (8, 512))]
    closed_form_profile(*setups[0][:3], "bf16", setups[0][3], setups[0][4])
    start = time.perf_counter()
    repeats = 20
    for _ in range(repeats):
        for shape, b, s, attn, config in setups:
            closed_form_profile(shape, b, s, "bf16", attn, config)
    return (time.perf_counter() - start) / (repeats * len(setups)), len(setups)


def child(cache: str) -> dict:
    """Run the 70B profile in a fresh Python process with ``cache`` as its profile cache."""
    env = {**os.environ, "ZEROEST_CACHE_DIR": cache}
    wall = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _CHILD, os.path.join(MODELS, "llama-2-70b.json")], env=env,
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - wall
    return result


def main() -> int:
    per_call, n = closed_form_per_setup()
    print(f"closed form: {per_call * 1e3:.3f} ms per setup (mean over {n} setups x 20; target < 1 ms)")
    with tempfile.TemporaryDirectory() as cache:
        cold = child(cache)
        print(f"traced llama-2-70b, cold process: {cold['s']:.2f} s in the call incl. imports "
              f"({cold['process_s']:.2f} s process wall; target < 10 s), source {cold['source']}, "
              f"backward peak {cold['backward_peak_gib']:.2f} GiB at 1 x 4096")
        warm = child(cache)
        print(f"traced llama-2-70b from the disk cache, fresh process: {warm['s'] * 1e3:.1f} ms "
              f"(target < 50 ms; torch imported: {warm['torch_imported']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Check the traced profile of models whose decoder layers differ against a trace of every layer (no GPU).

For each config (the data/runs/h200-families models, and variants whose layers differ more), at micro-batch 2 and
sequence 512, bf16, sdpa, CUDA kernels mimicked: the profile ``tracer.traced_profile`` gives (two layers of each
kind of layer, ``trace.kinds``) against ``recorder.run_trace`` over the whole model on the meta device (its saved
storages alive at the end of forward, its live bytes event by event, parameter gradients left out).

Usage: ``python benchmarks/layer_kinds_check.py [--runs data/runs/h200-families/models]``; one line per config
and quantity: the full-depth trace in MiB, the profile's error in bytes.

Seen on the CPU (torch 2.13, transformers 5.24, 2026-12-02), 9 configs x 4 quantities: the stack, forward end and
backward peak equal to the byte; the forward peak 112 bytes over for all but the sliding-window variant (the
(b, s + 1) padded labels fitted as b*s, as in benchmarks/cuda_check_activations.py). Before trace.kinds (main
at c1059f5) the profile missed the full-depth backward peak by -9.60% (deepseek-v3-small, first_k_dense_replace
3), -2.85% (qwen3-moe-small, mlp_only_layers 0-3) and -1.36% (qwen3-small, 256-token window on 8 of 16 layers).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

B, S = 2, 512
VARIANTS = {
    "deepseek-v3-small": {"first_k_dense_replace": 3},
    "qwen3-moe-small": {"mlp_only_layers": [0, 1, 2, 3]},
    "qwen3-small": {"use_sliding_window": True, "sliding_window": 256, "max_window_layers": 8},
}
"""Variants of the measured configs with more kinds of layer: 3 dense layers below the MoE ones, half the MoE
layers dense, the upper half of the layers with a 256-token window (shorter than the sequence)."""


def full_depth(config: dict) -> dict[str, int]:
    """Stack (embeddings and layers), forward end, forward peak and backward peak of the whole model traced."""
    import torch
    from zeroest.estimator.trace.model import build_model
    from zeroest.estimator.trace.recorder import replay, run_trace

    model = build_model(config, "bf16", "sdpa", num_layers=None)
    trace = run_trace(model, torch.zeros((B, S), dtype=torch.long, device="meta"), grad_ckpt=False)
    return replay(trace)


def main() -> int:
    from zeroest.estimator.core.architecture import shape_from_config
    from zeroest.estimator.trace import tracer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="data/runs/h200-families/models", help="folder of config.json files")
    args = parser.parse_args()
    configs = {}
    for path in sorted(Path(args.runs).glob("*.json")):
        config = json.loads(path.read_text())
        configs[path.stem] = config
        if path.stem in VARIANTS:
            configs[f"{path.stem} {VARIANTS[path.stem]}"] = {**config, **VARIANTS[path.stem]}
    for name, config in configs.items():
        profile = tracer.traced_profile(shape_from_config(config, name), B, S, config=config, use_cache=False)
        truth = full_depth(config)
        for quantity, value in truth.items():
            error = getattr(profile, f"{quantity}_bytes")(False) - value
            print(f"{name:70s} {quantity:14s} {value / 2**20:10.2f} MiB  profile {error:+d} B")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A first request sequence built without a GPU, replayed through the allocator model: LoRA at ZeRO-2.

usage (CPU; torch, transformers and peft installed):
  python benchmarks/sequence_replay_lora.py data/runs/h200-families2/models/ministral-8b.json --micro-batch 1 \
      --seq-len 1024

``benchmarks/allocator_replay.py`` showed that the caching allocator, fed a run's recorded requests, gives its peak
reserve to the byte. This script asks how far a sequence built from the estimator's own pieces gets, on the
simplest case, LoRA r16 on all linear layers at ZeRO-2 with checkpointing (rank 0 of N_d = 2), in the custom loop:

* the build: every parameter and buffer of the wrapped model in ``named_parameters`` order, in bf16;
* DeepSpeed's init (stage_1_and_2.py ``DeepSpeedZeroOptimizer.__init__``), reduced to the trainable parameters:
  their flat 16-bit copy, the per-tensor originals freed, the partition's 16-bit clone and fp32 master, then the
  ``empty_cache`` DeepSpeed calls (its peak reset with it);
* each step: the input ids, then the forward and backward storages of ``trace.recorder.run_trace`` on the meta
  device at full depth and the run's shape, in their order; the ipg bucket (``reduce_bucket_size`` elements of
  16 bits, stage_1_and_2.py ``setup_buckets``) at the first parameter gradient of each backward, released at its
  end (``_release_ipg_buffers``, as a recorded run shows); the logits kept until the next forward returns (the
  custom loop keeps ``outputs``); parameter gradients freed after backward (copied into the bucket); at step 0's
  end the fp32 gradient partition and Adam's two states.

Left out: kernel workspaces (cuBLAS, cuDNN attention), DeepSpeed's small buffers and its hooks' own order. Prints
the replayed reserve after the build, the init and each step, to set against a measured row (docs/DEVICE_RUNS.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

GiB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a model's config.json")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--bucket", type=int, default=500_000_000, help="reduce_bucket_size, elements")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).parent))
    import torch
    from allocator_replay import CachingAllocatorModel
    from zeroest.estimator.core.adapters import Adapters
    from zeroest.estimator.trace.model import build_trained
    from zeroest.estimator.trace.recorder import run_trace

    config = json.loads(Path(args.config).read_text())
    adapters = Adapters(lora_rank=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_targets="all-linear")
    started = time.perf_counter()
    model = build_trained(config, "bf16", "sdpa", adapters, grad_ckpt=True, num_layers=None)
    ids = torch.zeros((args.micro_batch, args.seq_len), dtype=torch.long, device="meta")
    trace = run_trace(model, ids, grad_ckpt=True, target="cuda")
    print(f"traced {len(trace.sizes)} storages at full depth in {time.perf_counter() - started:.0f} s")

    allocator = CachingAllocatorModel()
    live: dict = {}

    def alloc(key, size: int) -> None:
        live[key] = allocator.malloc(size)

    def free(key) -> None:
        block = live.pop(key, None)
        if block is not None:
            allocator.free(block)

    def report(name: str) -> None:
        print(f"{name:8s} peak reserved {allocator.peak_reserved / GiB:.3f} GiB, allocated "
              f"{allocator.allocated / GiB:.3f} GiB")

    for name, param in model.named_parameters():
        alloc(("param", name), param.numel() * param.element_size())
    for name, buffer in model.named_buffers():
        alloc(("buffer", name), buffer.numel() * buffer.element_size())
    report("build")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    alloc("flat", 2 * trainable)
    for name, param in model.named_parameters():
        if param.requires_grad:
            free(("param", name))
    alloc("clone", trainable)  # the rank's half, 16 bits
    alloc("master", 2 * trainable)  # the rank's half, fp32
    free("clone")
    allocator.empty_cache()
    allocator.reset_peak()
    report("init")
    kept = None
    first_grad, forward_end = trace.marks.get("first_grad"), trace.marks["fwd_end"]
    for step in range(args.steps):
        alloc(("ids", step), 8 * args.micro_batch * args.seq_len)
        for at, event in enumerate(trace.events):
            if at == first_grad:
                alloc(("bucket", step), 2 * args.bucket)
            if at == forward_end and kept is not None:
                free(kept)
                kept = None
            serial = event if event >= 0 else ~event
            if event >= 0:
                alloc((step, serial), trace.sizes[serial])
            elif serial == trace.logits:
                kept = (step, serial)
            else:
                free((step, serial))
        for key in [k for k in live if isinstance(k[0], int) and k[0] == step and k[1] in trace.excluded]:
            free(key)
        free(("bucket", step))  # stage_1_and_2.py _release_ipg_buffers at the end of each backward
        if step == 0:
            for name in ("fp32_grad", "exp_avg", "exp_avg_sq"):
                alloc(name, 2 * trainable)  # fp32, the rank's half
        free(("ids", step))
        report(f"step {step}")


if __name__ == "__main__":
    main()

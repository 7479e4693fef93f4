"""A ZeRO run's request sequence, any stage, built on the CPU and replayed by the allocator model, against a recording.

usage (CPU; torch, transformers and peft installed):
  python benchmarks/sequence_replay.py CONFIG --stage 2 --world 2 --micro-batch 2 --seq-len 2048 --ckpt \
      [--grad-accum 4] [--overlap] [--fp16] [--offload] [--lora-rank 16] [--param-groups 2] [--loop trainer] \
      [--expandable] [--events data/runs/h200-sequences/long8-events.json.gz]
  (at stage 3 pass --overlap for DeepSpeed's default, overlap_comm on: the gathers and reductions on their streams)

``benchmarks/allocator_replay.py`` showed that the caching allocator, fed a run's recorded requests, gives its peak
reserve to the byte, and its ``--events-out`` keeps a run's whole sequence (``data/runs/h200-sequences``). This script
builds that sequence as the estimate does (``zeroest.estimator.core.requests``, at stage 0 ``core.zero0_requests``, at
stage 3 ``core.zero3_requests``, whose docstrings list the requests; the model, its trace and the builder from
``zeroest.estimator.trace.requests``) and prints the replayed reserve at the end of each phase; with ``--events``,
beside the recording's own replay, and the sizes of 64 MiB and more that the two make a different number of times.
``--full-depth`` traces every decoder layer instead of four expanded.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from collections import Counter
from pathlib import Path

GiB, MiB = 2**30, 2**20


def recorded(path: str) -> tuple[dict[str, float], list[int]]:
    """The recording's own replay per phase, and its requests of 64 MiB and more (sizes, in order)."""
    from allocator_replay import ACTION_CODES, replay

    data = json.loads(gzip.decompress(Path(path).read_bytes()))
    actions = {code: action for action, code in ACTION_CODES.items()}
    events = [{"action": actions[code], "size": size, "stream": stream, "addr": block}
              for code, size, stream, block in data["events"]]
    phases = replay(events, [tuple(m) for m in data["marks"]])
    large = [size for code, size, _, _ in data["events"] if code == "a" and size >= 64 * MiB]
    return {name: p["replayed_peak_reserved_gib"] for name, p in phases.items() if not name.startswith("_")}, large


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a model's config.json")
    parser.add_argument("--stage", type=int, choices=(0, 1, 2, 3), default=2)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--ckpt", action="store_true")
    parser.add_argument("--offload", action="store_true")
    parser.add_argument("--loop", choices=("custom", "custom-del", "trainer"), default="custom",
                        help="custom: outputs kept until the next forward returns; custom-del: until the micro-step "
                             "ends; trainer: only the loss")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    parser.add_argument("--overlap", action="store_true", help="overlap_comm on")
    parser.add_argument("--fp16", action="store_true", help="fp16 training (bf16 otherwise)")
    parser.add_argument("--optimizer", default="adamw-torch",
                        help="the step's update (core.zero12_requests.UPDATES: adamw-torch, adamw-fused, lion, sgd, "
                             "sgd-momentum, adafactor)")
    parser.add_argument("--lora-rank", type=int, default=0)
    parser.add_argument("--param-groups", type=int, choices=(1, 2), default=1)
    parser.add_argument("--attn", default="sdpa", help="the attention implementation the row ran (eager, sdpa)")
    parser.add_argument("--bucket", type=int, default=500_000_000, help="reduce_bucket_size, elements")
    parser.add_argument("--flatten-on-cpu", action="store_true",
                        help="the first group flattens on the host (the card's free memory is short of it: "
                             "core/capacity.py flatten_decision)")
    parser.add_argument("--full-depth", action="store_true",
                        help="trace every decoder layer, not four expanded to full depth")
    parser.add_argument("--events", help="a recording of the same row (allocator_replay.py --events-out)")
    parser.add_argument("--expandable", action="store_true",
                        help="the row ran with expandable segments (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True)")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).parent))
    from zeroest.estimator.core.adapters import Adapters
    from zeroest.estimator.core.allocator import replay
    from zeroest.estimator.core.request_types import RequestSpec
    from zeroest.estimator.trace.requests import build_sequence, model_and_trace

    config = json.loads(Path(args.config).read_text())
    adapters = (Adapters(lora_rank=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_targets="all-linear")
                if args.lora_rank else Adapters())
    started = time.perf_counter()
    model, trace, expanded = model_and_trace(config, "bf16", args.attn, adapters, ckpt=args.ckpt,
                                             micro_batch=args.micro_batch, seq_len=args.seq_len,
                                             cut=not args.full_depth, zero3=args.stage == 3)
    depth = "four layers, expanded" if expanded else "full depth"
    print(f"traced {len(trace.sizes)} storages ({depth}) in {time.perf_counter() - started:.1f} s")
    spec = RequestSpec(stage=args.stage, world=args.world, offload=args.offload, loop=args.loop,
                       param_groups=args.param_groups, bucket_elements=args.bucket, flatten_on_cpu=args.flatten_on_cpu,
                       grad_accum=args.grad_accum, overlap=args.overlap, optimizer=args.optimizer, fp16=args.fp16)
    seq = build_sequence(model, trace, spec)
    result = replay(seq, expandable=args.expandable)
    built = {name: size / GiB for name, size in result.phases.items()}
    print(f"peak reserve of the run, across DeepSpeed's resets: {result.peak_reserved_bytes / GiB:.3f} GiB")
    ours = sorted(op[2] for op in seq.ops if op[0] == "a" and op[2] >= 64 * MiB)
    theirs: dict[str, float] = {}
    if args.events:
        theirs, large = recorded(args.events)
        print(f"requests of 64 MiB and more: built {len(ours)}, recorded {len(large)}")
        mine, rec = Counter(size // MiB for size in ours), Counter(size // MiB for size in large)
        for mib in sorted(set(mine) | set(rec)):
            if mine[mib] != rec[mib]:
                print(f"  {mib:6d} MiB: built {mine[mib]}, recorded {rec[mib]}")
    for name, gib in built.items():
        other = theirs.get(name)
        print(f"{name:16s} built {gib:7.3f} GiB" + (f"   recording {other:7.3f} GiB  ({gib / other - 1:+.1%})"
                                                    if other else ""))


if __name__ == "__main__":
    main()

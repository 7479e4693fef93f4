"""The ZeRO-1/2 request sequence built on the CPU, held against every measured row it covers.

usage (CPU; torch, transformers and peft installed; a few seconds a row):
  python benchmarks/sequence_rows.py data/runs/h100-default data/runs/h100-holdout data/runs/h100-launchers \
      'data/runs/h200-*' [--json OUT.json]

For each row of the runs folders (as ``zeroest report`` reads them) at ZeRO stage 1 or 2 that
``sequence_replay.py`` builds (rank 0 of a simulated job, the default allocator, no gradient accumulation, AdamW from
torch or DeepSpeedCPUAdam with optimizer offload, bf16, the custom or trainer loop, ``overlap_comm`` off and
``contiguous_gradients`` on, full fine-tuning or LoRA on all linear layers) it traces the model at the row's shape
(four decoder layers expanded to full depth, ``trace.sequence.expand``, where the layers are of one kind), builds the
sequence with DeepSpeed's flatten branch as ``core/capacity.py`` decides it for the row's card, replays three steps
through the allocator model and sets the peak reserve against the measured one, beside the current estimator's
error. Where the row names a card and the built reserve passes what the allocator may hold there (the card less the
CUDA context), the run is predicted to free its cache and retry (``num_alloc_retries``): its reserve is then not a
prediction of this model, and the row is counted apart. The other rows are skipped with the reason counted.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
import time
import types
from collections import Counter
from pathlib import Path

GiB, MiB = 2**30, 2**20


def skip_reason(record) -> str | None:
    """Why ``sequence_replay.build`` does not cover a measured row, or None."""
    s, data = record.setup, record.row.data
    checks = (
        (int(s.stage) not in (1, 2), "stage 0 or 3"),
        (not data.get("simulated"), "real ranks"),
        (s.expandable_segments, "expandable segments"),
        (s.workload.grad_accum != 1, "gradient accumulation"),
        (str(s.optimizer.name) != "adamw" or str(s.optimizer.impl) not in ("torch", "cpu"), "optimizer"),
        (str(s.dtype) != "bf16", "dtype"),
        (str(s.workload.loop) not in ("custom", "trainer"), "loop"),
        (bool(s.zero.overlap_comm) or not s.zero.contiguous_gradients, "overlap_comm or contiguous_gradients"),
        (bool(s.adapters.lora_rank) and str(s.adapters.lora_targets) != "all-linear", "LoRA targets"),
        (bool(s.adapters.freeze or s.adapters.modules_to_save) or str(s.adapters.base_quant) != "none",
         "frozen parameters or a quantised base"),
        (data.get("status") != "ok" or not record.measured.get("peak_reserved"), "not a finished run"),
    )
    return next((why for failed, why in checks if failed), None)


def built_reserve(record, sequence_replay) -> tuple[float, bool]:
    """The built sequence's peak reserve (bytes) for a measured row, and whether the flat group went to the host."""
    from zeroest.estimator.core.adapters import Adapters
    from zeroest.estimator.core.capacity import flatten_decision
    from zeroest.estimator.core.hf_config import hf_config
    from zeroest.estimator.core.overheads import Overheads

    s = record.setup
    adapters = (Adapters(lora_rank=s.adapters.lora_rank, lora_alpha=s.adapters.lora_alpha, lora_targets="all-linear")
                if s.adapters.lora_rank else Adapters())
    model, trace, _ = sequence_replay.model_and_trace(
        hf_config(s.model), str(s.workload.attn), adapters, ckpt=s.workload.grad_ckpt,
        micro_batch=s.workload.micro_batch, seq_len=s.workload.seq_len, cut=True)
    numel = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    decision = flatten_decision(s, numel, Overheads(), real_comm=False, trainable_numel=trainable)
    on_cpu = bool(decision and not decision.on_gpu)
    args = types.SimpleNamespace(stage=int(s.stage), world=s.world_size, micro_batch=s.workload.micro_batch,
                                 seq_len=s.workload.seq_len, offload=str(s.zero.offload_optimizer) != "none",
                                 loop=str(s.workload.loop), param_groups=s.optimizer.param_groups, steps=3,
                                 bucket=s.zero.reduce_bucket_size, flatten_on_cpu=on_cpu)
    phases = sequence_replay.replay_sequence(sequence_replay.build(model, trace, args))
    return max(phases.values()) * GiB, on_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="runs folders (shell patterns allowed)")
    parser.add_argument("--json", help="write the per-row results here")
    parser.add_argument("--min-gib", type=float, default=4.0, help="rows measured at least this reserved count")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).parent))
    import sequence_replay
    from zeroest.estimator.core.overheads import Overheads

    from zeroest.report.analysis import analyze

    folders = sorted({p for pattern in args.folders for p in (glob.glob(pattern) or [pattern])})
    analysis = analyze(folders)
    reasons = Counter()
    rows = []
    context = Overheads().cuda_context_bytes
    for record in analysis.records:
        why = skip_reason(record)
        if why:
            reasons[why] += 1
            continue
        started = time.perf_counter()
        built, on_cpu = built_reserve(record, sequence_replay)
        measured = record.measured["peak_reserved"]
        card = record.setup.gpu_memory_bytes
        limit = (card - context) // (2 * MiB) * (2 * MiB) if card else None
        estimated = record.current.quantities["peak_reserved"]
        row = {"row": record.row.where, "measured_gib": measured / GiB, "built_gib": built / GiB,
               "error": built / measured - 1, "estimator_error": estimated / measured - 1,
               "retry_predicted": bool(limit and built > limit), "flatten_on_cpu": on_cpu}
        rows.append(row)
        print(f"{row['error']:+7.1%} (estimator {row['estimator_error']:+6.1%}) {record.row.where:45s} measured "
              f"{row['measured_gib']:6.2f} built {row['built_gib']:6.2f} GiB"
              f"{' retry predicted' if row['retry_predicted'] else ''} {time.perf_counter() - started:.0f} s",
              flush=True)
    print("skipped:", ", ".join(f"{why} {n}" for why, n in reasons.most_common()))
    held = [r for r in rows if r["measured_gib"] >= args.min_gib and not r["retry_predicted"]]
    if held:
        built = [abs(r["error"]) for r in held]
        estimator = [abs(r["estimator_error"]) for r in held]
        print(f"{len(held)} rows of {args.min_gib:g} GiB and more, no retry predicted: built median "
              f"{statistics.median(built):.2%}, max {max(built):.2%}; the estimator median "
              f"{statistics.median(estimator):.2%}, max {max(estimator):.2%}; built under by more than 0.5% on "
              f"{sum(r['error'] < -0.005 for r in held)}")
    retried = [r for r in rows if r["retry_predicted"]]
    if retried:
        print(f"{len(retried)} rows where the built reserve passes the card's limit (a retry predicted)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""The ZeRO-1/2 request sequence built on the CPU, held against every measured row it covers.

usage (CPU; torch, transformers and peft installed; a few seconds a row):
  python benchmarks/sequence_rows.py data/runs/h100-default data/runs/h100-holdout data/runs/h100-launchers \
      'data/runs/h200-*' [--json OUT.json]

For each row of the runs folders (as ``zeroest report`` reads them) that the request sequence covers
(``core.requests.sequence_gap``: ZeRO stage 1 or 2, the default allocator, no gradient accumulation, AdamW from torch
or DeepSpeedCPUAdam with optimizer offload, bf16, the custom or trainer loop, ``overlap_comm`` off and
``contiguous_gradients`` on, full fine-tuning or LoRA on all linear layers), run as rank 0 of a simulated job, it
builds the sequence as the estimate does (``trace.requests.sequence_replay``, not cached here: four decoder layers
traced and expanded to full depth where the layers are of one kind, DeepSpeed's flatten branch as ``core/capacity.py``
decides it for the row's card, three steps) and sets its peak reserve over the run against the measured one, beside
the current estimator's error (which uses the same sequence for these rows where torch can trace: the
``estimator`` column is then the sequence's, capped by the card). Where the row names a card and the built reserve
passes what the allocator may hold there (the card less the CUDA context), the run is predicted to free its cache
and retry (``num_alloc_retries``): its reserve is then not a prediction of this model, and the row is counted apart.
The other rows are skipped with the reason counted.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import time
from collections import Counter
from pathlib import Path

GiB, MiB = 2**30, 2**20


def skip_reason(record, real_ranks: bool = False) -> str | None:
    """Why the request sequence does not cover a measured row (``core.requests.sequence_gap``, and rows of real
    ranks unless ``real_ranks``, or runs that did not finish), or None."""
    from zeroest.estimator.core.requests import sequence_gap

    data = record.row.data
    if not data.get("simulated") and not (real_ranks and data.get("gpu")):
        return "real ranks"
    if data.get("status") != "ok" or not record.measured.get("peak_reserved"):
        return "not a finished run"
    return sequence_gap(record.setup)


def built_reserve(record) -> tuple[float, bool]:
    """The built sequence's peak reserve over the run (bytes) for a measured row, and whether the flat group went to
    the host (DeepSpeed's branch for the row's card, ``core.capacity``)."""
    from zeroest.estimator.core.capacity import flatten_decision
    from zeroest.estimator.core.model_states import trained
    from zeroest.estimator.core.overheads import Overheads
    from zeroest.estimator.trace.requests import sequence_replay

    s = record.setup
    split = trained(s)
    decision = flatten_decision(s, split.total_numel, Overheads(), real_comm=False,
                                trainable_numel=split.trainable_numel)
    on_cpu = bool(decision and not decision.on_gpu)
    return sequence_replay(s, flatten_on_cpu=on_cpu, use_cache=False).peak_reserved_bytes, on_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="runs folders (shell patterns allowed)")
    parser.add_argument("--json", help="write the per-row results here")
    parser.add_argument("--min-gib", type=float, default=4.0, help="rows measured at least this reserved count")
    parser.add_argument("--real-ranks", action="store_true",
                        help="also rows of real ranks on GPUs (NCCL), built as if simulated: whether the sequence "
                             "holds there too")
    args = parser.parse_args()

    from zeroest.estimator.core.overheads import Overheads

    from zeroest.report.analysis import analyze

    folders = sorted({p for pattern in args.folders for p in (glob.glob(pattern) or [pattern])})
    analysis = analyze(folders)
    reasons = Counter()
    rows = []
    context = Overheads().cuda_context_bytes
    for record in analysis.records:
        why = skip_reason(record, args.real_ranks)
        if why:
            reasons[why] += 1
            continue
        started = time.perf_counter()
        built, on_cpu = built_reserve(record)
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

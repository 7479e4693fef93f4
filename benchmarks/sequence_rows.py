"""The ZeRO-1/2 request sequence built on the CPU, held against every measured row it covers.

usage (CPU; torch, transformers and peft installed; a few seconds a row):
  python benchmarks/sequence_rows.py data/runs/h100-default data/runs/h100-holdout data/runs/h100-launchers \
      'data/runs/h200-*' [--json OUT.json]

For each row of the runs folders (as ``zeroest report`` reads them) that the request sequence covers
(``core.requests.sequence_gap`` lists which: every ZeRO stage, with the optimizers, dtypes and loops it names), run
as rank 0 of a simulated job (with
``--real-ranks`` also single-GPU runs), it builds the sequence as the estimate does (``trace.requests.sequence_replay``,
not cached here: four decoder layers traced and expanded to full depth where the layers are of one kind, DeepSpeed's
flatten branch as ``core/capacity.py`` decides it for the row's card, three steps, replayed under the allocator's
limit on the row's card, retrying as torch does) and sets its peak reserve over the run against the measured one,
with the retries built and measured, beside the current estimator's error (which uses the same sequence for these
rows where torch can trace). The other rows are skipped with the reason counted.
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


def built_reserve(record):
    """The built sequence replayed for a measured row (``core.allocator.RequestReplay``) under the allocator's limit on
    the row's card, as the estimate replays it, and whether the flat group went to the host (DeepSpeed's branch for
    the card, ``core.capacity``)."""
    from zeroest.estimator.core.capacity import flatten_decision
    from zeroest.estimator.core.model_states import trained
    from zeroest.estimator.core.overheads import Overheads, allocator_limit_bytes
    from zeroest.estimator.trace.requests import sequence_replay

    s, real = record.setup, not record.row.data.get("simulated")
    split = trained(s)
    decision = flatten_decision(s, split.total_numel, Overheads(), real_comm=real,
                                trainable_numel=split.trainable_numel)
    on_cpu = bool(decision and not decision.on_gpu)
    card = s.gpu_memory_bytes or 0
    limit = allocator_limit_bytes(card, Overheads(), peers=s.world_size - 1, real_comm=real) if card else 0
    return sequence_replay(s, flatten_on_cpu=on_cpu, limit_bytes=limit, use_cache=False), on_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="runs folders (shell patterns allowed)")
    parser.add_argument("--json", help="write the per-row results here")
    parser.add_argument("--min-gib", type=float, default=4.0, help="rows measured at least this reserved count")
    parser.add_argument("--stage", type=int, action="append", help="only rows of this ZeRO stage (repeatable)")
    parser.add_argument("--real-ranks", action="store_true",
                        help="also rows of real ranks on GPUs (NCCL), built as if simulated: whether the sequence "
                             "holds there too")
    args = parser.parse_args()

    from zeroest.report.analysis import analyze

    folders = sorted({p for pattern in args.folders for p in (glob.glob(pattern) or [pattern])})
    analysis = analyze(folders)
    reasons = Counter()
    rows = []
    for record in analysis.records:
        if args.stage and int(record.setup.stage) not in args.stage:
            continue
        why = skip_reason(record, args.real_ranks)
        if why:
            reasons[why] += 1
            continue
        started = time.perf_counter()
        built, on_cpu = built_reserve(record)
        measured = record.measured["peak_reserved"]
        estimated = record.current.quantities["peak_reserved"]
        row = {"row": record.row.where, "measured_gib": measured / GiB,
               "built_gib": built.peak_reserved_bytes / GiB, "error": built.peak_reserved_bytes / measured - 1,
               "estimator_error": estimated / measured - 1, "retries": built.retries,
               "oom_predicted": built.out_of_memory, "measured_retries": _measured_retries(record),
               "flatten_on_cpu": on_cpu}
        rows.append(row)
        print(f"{row['error']:+7.1%} (estimator {row['estimator_error']:+6.1%}) {record.row.where:45s} measured "
              f"{row['measured_gib']:6.2f} built {row['built_gib']:6.2f} GiB, retries built {built.retries} "
              f"measured {row['measured_retries']}{' OOM predicted' if built.out_of_memory else ''} "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    print("skipped:", ", ".join(f"{why} {n}" for why, n in reasons.most_common()))
    held = [r for r in rows if r["measured_gib"] >= args.min_gib]
    if held:
        built = [abs(r["error"]) for r in held]
        estimator = [abs(r["estimator_error"]) for r in held]
        print(f"{len(held)} rows of {args.min_gib:g} GiB and more: built median {statistics.median(built):.2%}, "
              f"max {max(built):.2%} (within 1% on {sum(e <= 0.01 for e in built)}, under by more than 5% on "
              f"{sum(r['error'] < -0.05 for r in held)}); the estimator median {statistics.median(estimator):.2%}, "
              f"max {max(estimator):.2%}; an OOM predicted for {sum(r['oom_predicted'] for r in held)} that finished")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def _measured_retries(record) -> int:
    """``num_alloc_retries`` at the run's last phase."""
    phases = (record.row.data.get("measured") or {}).get("phases") or {}
    return max((p.get("num_alloc_retries") or 0 for p in phases.values()), default=0)


if __name__ == "__main__":
    main()

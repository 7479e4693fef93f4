"""Does a model of torch's caching allocator, fed the real sequence of requests, reproduce the reserve a run measures?

usage (GPU machine, zeroest and DeepSpeed installed as for ``zeroest validate``; from /tmp, as snapshot_peak.py):
  python benchmarks/allocator_replay.py --grid data/grids/long.yaml --row 4 --steps 3 --out $OUT/long4.json

Runs grid row ``--row`` (simulated rows only) as the validate worker does, with the allocator's memory history
recorded (sizes and streams; two Python frames each too under ``--stacks python``) from before the model is built to
the end of step ``--steps - 1``, and reads ``max_memory_reserved`` at the end of every phase. It then replays the
recorded ``alloc`` and ``free_completed`` events, in order, through ``CachingAllocatorModel`` and writes, per phase,
the measured and the replayed peak reserve (and the replay's segments). If the replay matches, the reserve is a
function of the request sequence alone, and a model of reserved memory needs the sequence (the timeline's blocks)
and this allocator, not fractions of phase totals; where it does not, the difference is what the model below leaves
out.

``CachingAllocatorModel`` (``zeroest.estimator.core.allocator``) is c10/cuda/CUDACachingAllocator.cpp with its
defaults, or with expandable segments where the run mapped them (``segment_map`` events: run it under
``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``); where the trace shows the run giving memory back
(``segment_free``, ``segment_unmap``), the replay gives back every segment with no live block (the pages inside every
free block) and, as DeepSpeed's runtime/utils.py ``empty_cache`` does, restarts its peak. No cap (rows on an
emulated card that retried under the cap are not comparable, and the result says how many retries there were).
"""

from __future__ import annotations

import argparse
import json
import os
import types
from pathlib import Path

from zeroest.estimator.core.allocator import Block, CachingAllocatorModel

GiB = 2**30
RELEASES = ("segment_free", "segment_unmap")
"""Trace actions of memory going back to the driver: a run of them is one ``empty_cache``."""


def replay(events: list[dict], marks: list[tuple[str, int]], *, expandable: bool | None = None) -> dict[str, dict]:
    """Replay ``alloc`` / ``free_completed`` trace events (``alloc`` records the size asked for, ``orig_size``);
    at each mark (phase name, the number of events recorded by its end) the replay's peak reserve and segment count,
    and the segments the run itself cut (``segment_alloc`` events). A free of a block allocated before the history
    began is skipped and counted. ``expandable``: the run mapped expandable segments (None: it did where the trace
    holds ``segment_map`` events); their ``segment_unmap`` then marks an ``empty_cache``."""
    if expandable is None:
        expandable = any(e["action"] == "segment_map" for e in events)
    model = CachingAllocatorModel(expandable=expandable)
    live: dict[int, Block] = {}
    unknown = cut = 0
    out: dict[str, dict] = {}
    bounds = iter(marks)
    name, end = next(bounds, (None, None))

    def record() -> dict:
        return {"replayed_peak_reserved_gib": model.peak_reserved / GiB, "replayed_segments": model.segments,
                "measured_segments": cut}

    for at, event in enumerate(events):
        while end is not None and at >= end:
            out[name] = record()
            name, end = next(bounds, (None, None))
        if event["action"] in ("segment_alloc", "segment_map"):
            cut += 1
        elif event["action"] in RELEASES and (at == 0 or events[at - 1]["action"] not in RELEASES):
            # the first segment an empty_cache() gives back: DeepSpeed's runtime/utils.py ``empty_cache`` then
            # also resets the peak statistics (``reset_peak_memory_stats``), as the measured maximum shows
            model.empty_cache()
            model.reset_peak()
        elif event["action"] == "alloc":
            live[event["addr"]] = model.malloc(event["size"], event.get("stream", 0))
        elif event["action"] == "free_completed":
            block = live.pop(event["addr"], None)
            if block is None:
                unknown += 1
            else:
                model.free(block)
    while name is not None:
        out[name] = record()
        name, end = next(bounds, (None, None))
    out["_unknown_frees"] = {"count": unknown}
    return out


ACTION_CODES = {"alloc": "a", "free_completed": "f", "segment_alloc": "S", "segment_free": "s", "segment_map": "M",
                "segment_unmap": "U"}


def write_events(path: str, events: list[dict], marks: list[tuple[str, int]]) -> None:
    """Every allocator event of ``ACTION_CODES``, in order, as ``[action, size, stream, block]`` (``block`` numbers
    each alloc and is repeated by its free; -1 for a free of a block allocated before the history began, and for
    segment events), gzipped JSON with the phase marks converted to row counts, and two frames of each request of
    1 MiB or more where the history kept stacks."""
    import gzip

    from snapshot_peak import _frames

    rows: list[list] = []
    frames: dict[int, list[str]] = {}
    block_of: dict[int, int] = {}
    rows_before: list[int] = []  # rows written before recorded event i (marks count recorded events)
    serial = 0
    for event in events:
        rows_before.append(len(rows))
        code = ACTION_CODES.get(event["action"])
        if code is None:
            continue
        addr, block = event.get("addr", 0), -1
        if code == "a":
            block, serial = serial, serial + 1
            block_of[addr] = block
            if event["size"] >= 2**20 and event.get("frames"):
                frames[len(rows)] = _frames(event)[:2]
        elif code == "f":
            block = block_of.pop(addr, -1)
        rows.append([code, event["size"], event.get("stream", 0), block])
    rows_before.append(len(rows))
    out_marks = [[name, rows_before[min(end, len(events))]] for name, end in marks]
    payload = {"marks": out_marks, "events": rows, "frames": frames}
    Path(path).write_bytes(gzip.compress(json.dumps(payload, separators=(",", ":")).encode()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", required=True)
    parser.add_argument("--row", type=int, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dump-mib", type=float, default=0.0,
                        help="also write every request and free of at least this many MiB, in order, with the "
                             "phase marks (and two Python frames each under --stacks python)")
    parser.add_argument("--stacks", choices=("none", "python"), default="none")
    parser.add_argument("--events-out", default=None,
                        help="also write every event, gzipped (``write_events``), to compare a sequence built on "
                             "the CPU with")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import contextlib

    from snapshot_peak import prepare_row  # the row's spec and process set up exactly as snapshot_peak.py does

    spec, _, emulated = prepare_row(args.grid, args.row)
    import deepspeed
    import torch
    from zeroest.validate import worker

    worker._init_distributed(spec, int(spec["setup"]["world_size"]))
    if args.stacks == "none":
        torch.cuda.memory._record_memory_history(max_entries=4_000_000, context=None)
    else:
        torch.cuda.memory._record_memory_history(max_entries=4_000_000, stacks="python")
    hf_config = worker.hf_deepspeed_config(spec)  # noqa: F841 - alive while the model is built (zero.Init)
    model = worker.build_model(spec)
    measured: dict[str, float] = {}
    marks: list[tuple[str, int]] = []

    def mark(name: str) -> None:
        torch.cuda.synchronize()
        measured[name] = torch.cuda.max_memory_reserved() / GiB
        marks.append((name, len(torch.cuda.memory._snapshot()["device_traces"][0])))

    @contextlib.contextmanager
    def phase(name: str):
        yield
        mark(name)

    from zeroest.validate.adapters import apply_adapters, parameter_groups
    from zeroest.validate.client_optimizers import client_optimizer
    from zeroest.validate.loops import train_steps

    model = apply_adapters(model, spec)[0]
    mark("build")
    params = parameter_groups(model, spec["setup"].get("param_groups") or 1)
    engine = deepspeed.initialize(model=model, model_parameters=params, config=spec["ds_config"],
                                  optimizer=client_optimizer(spec, params))[0]
    del model, params
    mark("init")
    train_steps({**spec, "steps": args.steps}, engine, types.SimpleNamespace(phase=phase), {"measured": {}},
                lambda: None)
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    events = snapshot["device_traces"][0]
    replayed = replay(events, marks)
    stats = torch.cuda.memory_stats()
    result = {
        "grid": args.grid, "row": args.row, "setup": spec["setup"], "emulated": emulated.get("emulated"),
        "events": len(events), "ring_full": len(events) >= 4_000_000,
        "num_alloc_retries": stats.get("num_alloc_retries", 0),
        "expandable": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "phases": {name: {"measured_max_reserved_gib": measured[name], **replayed.get(name, {})}
                   for name, _ in marks},
        "unknown_frees": replayed["_unknown_frees"]["count"],
    }
    if args.dump_mib:
        from snapshot_peak import _frames

        floor = args.dump_mib * 2**20
        result["marks"] = marks
        result["large_events"] = [
            [at, e["action"], e["size"], e.get("stream", 0), e.get("addr", 0), _frames(e)[:2]]
            for at, e in enumerate(events)
            if e["size"] >= floor and e["action"] in ("alloc", "free_completed", "segment_alloc", "segment_free")]
    Path(args.out).write_text(json.dumps(result, indent=1))
    if args.events_out:
        write_events(args.events_out, events, marks)
    last = marks[-1][0]
    print(json.dumps({"measured": measured[last], "replayed": result["phases"][last].get("replayed_peak_reserved_gib"),
                      "retries": result["num_alloc_retries"], "events": len(events)}))


if __name__ == "__main__":
    main()

"""What is live at one phase's peak of a validation run on the GPU: the allocator's memory history over that phase.

usage (GPU machine, zeroest and DeepSpeed installed as for ``zeroest validate``):
  python benchmarks/snapshot_peak.py --grid data/grids/misses.yaml --row 4 --phase backward --out $OUT/row4.json

Runs grid row ``--row`` (1-based, simulated rows only: rank 0 on the fake process group) exactly as the validate
worker does (the spec from ``validate.runner.plan``; ``worker.build_model``; the row's loop, run by
``validate.loops.train_steps`` itself: the custom loop keeps the outputs, logits included, through backward and
step), records ``torch.cuda.memory._record_memory_history`` during ``--phase`` of step ``--step`` (init:
``deepspeed.initialize``) and replays the trace to the moment of most bytes allocated. Writes: every phase's
``max_memory_allocated``, the prediction's components of that phase, the bytes allocated before the phase and still
live at its peak, the 30 largest blocks live at the peak with their Python stacks (torch's own frames dropped), the
live bytes grouped by the first DeepSpeed/transformers/zeroest frame that allocated them, every phase's
``max_memory_reserved``, and why the reserve grew in the phase: the segments cudaMalloc'd during it with the request
that made each one, and the cache's segments and free blocks at its end. One 7B model at N_d 8 takes about 40 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import types
from collections import defaultdict
from pathlib import Path

GiB = 2**30


def _spec(grid: str, row: int) -> tuple[dict, dict | None]:
    from zeroest.validate.grid import apply_overrides, load_grid
    from zeroest.validate.runner import ValidateOptions, plan

    loaded = load_grid(grid)
    entries = apply_overrides(loaded, [], [])
    if not 1 <= row <= len(entries):
        raise SystemExit(f"--row {row}: the grid has rows 1-{len(entries)}")
    (run,) = plan([entries[row - 1]], loaded.models, ValidateOptions(out=Path(tempfile.mkdtemp())), visible_gpus=1)
    if not run.simulated:
        raise SystemExit(f"row {row} is not simulated: this script runs rank 0 of a fake world only")
    return {**run.spec, "run_dir": tempfile.mkdtemp()}, run.prediction


def prepare_row(grid: str, row: int) -> tuple[dict, dict | None, dict]:
    """(spec, prediction, what ``emulate_card`` recorded) of grid row ``row``, with this process set up as the
    worker sets up its own (its environment, and the emulated card's cap where the row names a card)."""
    spec, prediction = _spec(grid, row)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    from zeroest.validate import worker
    from zeroest.validate.emulate import emulate_card

    worker._environment(spec)
    emulated: dict = {}
    emulate_card(spec["setup"], emulated)  # a row on an emulated card runs capped, as the worker runs it
    return spec, prediction, emulated


def _frames(event: dict) -> list[str]:
    out = []
    for frame in event.get("frames", []):
        name = frame.get("filename", "")
        if "site-packages/torch/" in name or "/torch/" in name and "site-packages" not in name:
            continue
        out.append(f"{name.split('site-packages/')[-1]}:{frame.get('line')} {frame.get('name')}")
    return out


def _replay(snapshot: dict, baseline: int) -> dict:
    """The moment of most bytes allocated in the recorded trace, and what was live then."""
    live: dict[int, dict] = {}
    unknown_freed = 0
    total = best = baseline
    best_live: list[dict] = []
    best_unknown = best_at = 0
    events = snapshot["device_traces"][0]
    for at, event in enumerate(events):
        event["at"] = at
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
        elif event["action"] == "free_completed":
            gone = live.pop(event["addr"], None)
            if gone is None:
                unknown_freed += event["size"]
            total -= event["size"]
        if total > best:
            best, best_live, best_unknown, best_at = total, list(live.values()), unknown_freed, at
    groups: dict[str, int] = defaultdict(int)
    for event in best_live:
        frames = _frames(event)
        groups[frames[0] if frames else "(no python frame)"] += event["size"]
    largest = sorted(best_live, key=lambda e: -e["size"])[:30]
    return {
        "history_peak_gib": best / GiB,
        "before_phase_still_live_gib": (baseline - best_unknown) / GiB,
        "peak_event": best_at,
        "largest_at_peak": [{"gib": e["size"] / GiB, "at": e["at"], "stack": _frames(e)[:8]} for e in largest],
        # the order of the large allocations and frees up to the peak: enough to read it without stacks
        "large_events_before_peak": [
            {"at": e["at"], "action": e["action"], "mib": round(e["size"] / 2**20, 1), "stack": _frames(e)[:2]}
            for e in events[:best_at + 1] if e["size"] >= 2**20 and e["action"] in ("alloc", "free_completed")
        ][-60:],
        "groups_at_peak_gib": {k: v / GiB for k, v in sorted(groups.items(), key=lambda kv: -kv[1])[:25]},
        **_segments(snapshot, events),
    }


def _segments(snapshot: dict, events: list[dict]) -> dict:
    """Why the reserve grew in the phase: every segment cudaMalloc'd during it (``segment_alloc``, with the request
    that made it: the ``alloc`` the allocator records right after), every segment given back (``segment_free``:
    an ``empty_cache`` or a retry), and the cache at the phase's end: segments by size, and the free bytes in
    them (``inactive`` blocks), the largest free block among them."""
    grown, returned = [], []
    for at, event in enumerate(events):
        if event["action"] == "segment_alloc":
            request = next((e for e in events[at + 1:at + 8] if e["action"] == "alloc"), None)
            grown.append({"at": at, "mib": round(event["size"] / 2**20, 1),
                          "request_mib": round(request["size"] / 2**20, 3) if request else None,
                          "stack": _frames(request)[:3] if request else []})
        elif event["action"] == "segment_free":
            returned.append({"at": at, "mib": round(event["size"] / 2**20, 1)})
    free_blocks = [b["size"] for seg in snapshot.get("segments", []) for b in seg.get("blocks", [])
                   if b.get("state") == "inactive"]
    by_size: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for seg in snapshot.get("segments", []):
        key = f"{seg.get('segment_type', '?')} {'<=20 MiB' if seg['total_size'] <= 20 * 2**20 else '>20 MiB'}"
        by_size[key][0] += 1
        by_size[key][1] += seg["total_size"] / GiB
    return {
        "segments_grown": grown,
        "segments_grown_gib": sum(g["mib"] for g in grown) / 1024,
        "segments_returned": returned,
        "segments_at_end": {k: {"count": v[0], "gib": v[1]} for k, v in sorted(by_size.items())},
        "free_in_cache_at_end_gib": sum(free_blocks) / GiB,
        "largest_free_block_at_end_mib": max(free_blocks, default=0) / 2**20,
        "free_blocks_over_100_mib": sorted((round(b / 2**20, 1) for b in free_blocks if b > 100 * 2**20),
                                           reverse=True)[:40],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", required=True)
    parser.add_argument("--row", type=int, required=True)
    parser.add_argument("--phase", choices=("init", "forward", "backward", "step"), default="backward")
    parser.add_argument("--step", type=int, default=1, help="0-based step whose phase is recorded (1: steady)")
    parser.add_argument("--stacks", choices=("python", "all", "none"), default="python",
                        help="stacks the history records (none: sizes and order only, where recording Python "
                             "frames breaks an autograd Function, as ZeRO-3's linear did once under torch 2.11)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    spec, prediction, emulated = prepare_row(args.grid, args.row)
    import torch
    from zeroest.validate import worker
    world = int(spec["setup"]["world_size"])
    import deepspeed

    worker._init_distributed(spec, world)
    hf_config = worker.hf_deepspeed_config(spec)  # noqa: F841 - alive while the model is built (zero.Init)
    model = worker.build_model(spec)
    peaks: dict[str, float] = {}
    reserved: dict[str, float] = {}
    record: dict = {}
    wanted = "init" if args.phase == "init" else f"step{args.step}.{args.phase}"

    @contextlib.contextmanager
    def phase(name: str):
        """A phase as the worker's meter brackets it (``validate.loops.train_steps`` calls ``meter.phase``); the
        memory history of the one asked for (micro-step 0 of an accumulated step)."""
        want = name in (wanted, f"{wanted}0")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        if want:
            if args.stacks == "none":
                torch.cuda.memory._record_memory_history(max_entries=2_000_000, context=None)
            else:
                torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks=args.stacks)
        yield
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() / GiB
        reserved[name] = torch.cuda.max_memory_reserved() / GiB
        if want:
            snapshot = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            record.update(_replay(snapshot, baseline), phase=name, baseline_gib=baseline / GiB)

    from zeroest.validate.adapters import apply_adapters, parameter_groups
    from zeroest.validate.client_optimizers import client_optimizer
    from zeroest.validate.loops import train_steps

    model = apply_adapters(model, spec)[0]
    with phase("init"):  # as the worker's init: its parameter groups and client optimizer
        params = parameter_groups(model, spec["setup"].get("param_groups") or 1)
        engine = deepspeed.initialize(model=model, model_parameters=params, config=spec["ds_config"],
                                      optimizer=client_optimizer(spec, params))[0]
        del model, params  # the engine keeps the only reference, as the worker's ``del model`` does
    setup = spec["setup"]
    # the row's loop as the worker runs it (what it keeps of the outputs, its inputs, its micro-steps)
    train_steps({**spec, "steps": args.step + 1}, engine, types.SimpleNamespace(phase=phase), {"measured": {}},
                lambda: None)
    predicted = (prediction or {}).get("phases", {}).get(args.phase, {})
    result = {
        "grid": args.grid, "row": args.row, "setup": setup, "emulated": emulated.get("emulated"),
        "max_allocated_gib": peaks,
        "max_reserved_gib": reserved,
        "predicted_phase_gib": {"peak": predicted.get("peak_bytes", 0) / GiB,
                                "components": {k: v / GiB for k, v in predicted.get("components", {}).items()}},
        **record,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({"max_allocated_gib": peaks, "history_peak_gib": record.get("history_peak_gib")}, indent=1))


if __name__ == "__main__":
    main()

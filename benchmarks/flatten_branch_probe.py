"""Which branch ZeRO-1/2 takes to flatten each parameter group on a grid row, and the free memory it compared.

usage (GPU machine, zeroest and DeepSpeed installed as for ``zeroest validate``):
  python benchmarks/flatten_branch_probe.py --grid data/grids/users.yaml --row 12 --out $OUT/probe.json

Runs grid row ``--row`` (1-based, simulated rows only) through the validate worker itself (``worker.run_spec``, one
optimizer step), with every call of DeepSpeed's ``get_accelerator().available_memory()`` logged: its result, the
caller's file and line, and the allocator's allocated and reserved bytes at that moment, plus DeepSpeed's own
"Flattening param group ..." lines (stage_1_and_2.py ``DeepSpeedZeroOptimizer.__init__``: on the device when
``available_memory() >= flat_buffer_bytes``, else on the host). The estimator's branch is the assumption line of
the row's prediction; this says what DeepSpeed did.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import traceback
from pathlib import Path

GiB = 2**30


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "Flattening param group" in message:
            self.lines.append(message)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", required=True)
    parser.add_argument("--row", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from snapshot_peak import _spec

    spec, prediction = _spec(args.grid, args.row)
    spec["steps"] = 1  # one optimizer step: the branch is taken in deepspeed.initialize
    import torch
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import logger as ds_logger
    from zeroest.validate import emulate, worker

    calls: list[dict] = []
    original_emulate = emulate.emulate

    def wrap(accelerator) -> None:
        inner = accelerator.available_memory

        def available_memory(device_index=None):
            value = inner(device_index)
            caller = traceback.extract_stack(limit=2)[0]  # the frame that called available_memory()
            calls.append({"available_gib": value / GiB, "caller": f"{Path(caller.filename).name}:{caller.lineno}",
                          "allocated_gib": torch.cuda.memory_allocated() / GiB,
                          "reserved_gib": torch.cuda.memory_reserved() / GiB,
                          "same_accelerator_object": get_accelerator() is accelerator})
            return value

        accelerator.available_memory = available_memory

    def emulate_and_wrap(card_bytes: int, device_index: int) -> dict:
        out = original_emulate(card_bytes, device_index)
        wrap(get_accelerator())
        return out

    emulate.emulate = emulate_and_wrap
    lines = _Lines()
    ds_logger.addHandler(lines)
    ds_logger.setLevel(logging.INFO)
    if not spec["setup"].get("gpu_memory_bytes"):
        wrap(get_accelerator())
    spec["run_dir"] = tempfile.mkdtemp()
    code = worker.run_spec(spec)
    rank_files = sorted(Path(spec["run_dir"]).glob("rank*.json"))
    rank = json.loads(rank_files[0].read_text()) if rank_files else {}
    phases = (rank.get("measured") or {}).get("phases") or {}
    result = {
        "grid": args.grid, "row": args.row, "setup": spec["setup"], "exit_code": code,
        "assumptions": [a for a in (prediction or {}).get("assumptions", []) if "flatten" in a],
        "deepspeed_flatten_lines": lines.lines,
        "available_memory_calls": calls,
        "init_peak_allocated_gib": (phases.get("init") or {}).get("peak_allocated_bytes", 0) / GiB,
        "predicted_init_gib": ((prediction or {}).get("phases", {}).get("init", {}).get("peak_bytes", 0)) / GiB,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("assumptions", "deepspeed_flatten_lines", "available_memory_calls",
                                             "init_peak_allocated_gib", "predicted_init_gib")}, indent=1))


if __name__ == "__main__":
    main()

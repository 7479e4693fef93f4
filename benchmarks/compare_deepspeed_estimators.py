"""How far DeepSpeed's own model-state estimators are from the measured peaks in data/runs, beside zeroest.

DeepSpeed's ``estimate_zero2_model_states_mem_needs`` (stages 0-2) and ``estimate_zero3_model_states_mem_needs``
(stage 3) count model states only: no activations, buffers or allocation timeline. Run:
``python benchmarks/compare_deepspeed_estimators.py [RUNS.jsonl ...]`` (default: the H100 default and holdout grids).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from zeroest.estimator.configs.flat import setup_from_row
from zeroest.estimator.core.architecture import count_params, param_tensors
from zeroest.estimator.core.estimate import estimate

from zeroest.report.runs import read_rows

DEFAULT = ["data/runs/h100-default/runs.jsonl", "data/runs/h100-holdout/runs.jsonl"]


def deepspeed_bytes(setup) -> int:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    numel, world = count_params(setup.model).total, setup.world_size
    offload = setup.zero.offload_optimizer != "none"
    if setup.stage == 3:
        largest = max(t.numel for t in param_tensors(setup.model))
        return estimate_zero3_model_states_mem_needs(numel, largest, num_gpus_per_node=world, cpu_offload=offload,
                                                     cpu_offload_params=setup.zero.offload_params != "none")[1]
    return estimate_zero2_model_states_mem_needs(numel, num_gpus_per_node=world, cpu_offload=offload)[1]


def summary(name: str, errors: list[float]) -> str:
    worst = max(abs(e) for e in errors)
    return (f"{name}: median error {statistics.median(errors) * 100:+.1f}%, median |error| "
            f"{statistics.median(abs(e) for e in errors) * 100:.1f}%, max |error| {worst * 100:.1f}%")


def main(paths: list[str]) -> None:
    rows = [row for path in paths for row in read_rows(Path(path))]
    rows = [r for r in rows if r["status"] == "ok" and r["measured"].get("peak_allocated_bytes")]
    ds, ours = [], []
    for row in rows:
        setup = setup_from_row(row["setup"])
        measured = row["measured"]["peak_allocated_bytes"]
        ds.append((deepspeed_bytes(setup) - measured) / measured)
        mine = estimate(setup, simulated=bool(row.get("simulated"))).peak_allocated_bytes
        ours.append((mine - measured) / measured)
    print(f"{len(rows)} measured ranks from {', '.join(paths)}")
    print("error = (predicted - measured) / measured peak allocated")
    print(summary("DeepSpeed's estimators", ds))
    print(summary("zeroest (defaults)   ", ours))


if __name__ == "__main__":
    main(sys.argv[1:] or DEFAULT)

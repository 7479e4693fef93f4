"""Shared helpers of the report tests (no tests here): synthetic runs.jsonl rows made by estimate() with known
overheads, so every expectation derives from estimate() itself. Setups use closed-form activations (fast,
deterministic, no tracing)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
from zeroest.estimator.core.overheads import Overheads
from zeroest.estimator.units import GiB, MiB

TRUE_OVERHEADS = Overheads(
    cuda_context_bytes=600 * MiB, cublas_workspace_bytes=300 * MiB, nccl_bytes_per_peer=96 * MiB,
    nccl_communicator_bytes=300 * MiB, reserved_fraction_of_peak=0.08, reserved_fraction_of_activations=0.25,
    reserved_fraction_of_gathered=0.4, reserved_fraction_expandable=0.5, activation_scale=1.15,
    source="truth",
)
"""The overheads synthetic "measurements" are made with; the fit must find them again. The reuse fraction stays
at its default: on the report tests' grid the flat step buffers either fit the cache whole or never set the peak,
so no value of it can be told from another (tests/test_reserved.py checks the term itself)."""

MODELS = ("gpt2", "opt-125m", "pythia-160m", "qwen2.5-0.5b", "gpt2-medium", "pythia-410m")
H100 = {"name": "NVIDIA H100 80GB HBM3", "memory_bytes": 80 * GiB}
VERSIONS = {"python": "3.11.7", "torch": "2.5.1+cu124", "cuda": "12.4", "driver": "550.54",
            "deepspeed": "0.16.3", "transformers": "4.46.0", "accelerate": "1.0.1"}


@pytest.fixture(scope="module")
def closed_form():
    """estimate() importable; the synthetic setups ask for closed-form activations (fast, no tracing)."""
    return importlib.import_module("zeroest.estimator.core.estimate")


def make_setup(model: str, stage: int, world: int, **workload):
    from zeroest.estimator.catalog.models import load_model
    from zeroest.estimator.core.setup import Parallelism, TrainingSetup, Workload, ZeroConfig

    w = {"micro_batch": 2, "seq_len": 512, "activations": "closed-form", **workload}
    return TrainingSetup(model=load_model(model), parallel=Parallelism(gpus_per_node=world),
                         zero=ZeroConfig(stage=stage), workload=Workload(**w))


def synthetic_row(setup, overheads: Overheads = TRUE_OVERHEADS, *, simulated: bool = False, rank: int = 0,
                  gpu: dict | None = None, version: str = "0.1.0", oom: str | None = None,
                  step_time_s: float = 1.0) -> dict:
    """A runs.jsonl row whose "measured" numbers are estimate(setup, overheads) (prediction made with
    defaults)."""
    from zeroest.estimator.configs.flat import setup_to_dict
    from zeroest.estimator.core.estimate import estimate

    truth = estimate(setup, overheads, simulated=simulated)
    phases = {"build": {"peak_allocated_bytes": 1}}
    for p in truth.phases:
        suffix = "" if p.name == "step" else "0"
        names = ["init"] if p.name == "init" else [f"step{k}.{p.name}{suffix}" for k in (0, 1, 2)]
        for name in names:
            phases[name] = {"peak_allocated_bytes": p.peak_bytes, "nvml_scope": "process"}
    flat = setup_to_dict(setup)
    tokens = flat["micro_batch"] * flat["seq_len"] * flat["world_size"]
    key = json.dumps({"setup": flat, "simulated": simulated}, sort_keys=True)
    return {
        "zeroest_version": version, "run_key": key, "setup": flat, "rank": rank,
        "world_size": flat["world_size"], "ranks_in_run": 1, "simulated": simulated,
        "status": "oom" if oom else "ok", "error": None, "prediction": estimate(setup).to_dict(),
        "measured": {"peak_allocated_bytes": truth.peak_allocated_bytes,
                     "peak_reserved_bytes": truth.peak_reserved_bytes, "device_bytes": truth.device_bytes,
                     "phases": phases, "oom": oom, "step_time_s": step_time_s,
                     "tokens_per_s": tokens / step_time_s},
        "versions": VERSIONS, "gpu": gpu or H100, "host": {"hostname": "test"}, "exclusive": True,
    }


def synthetic_grid(models=MODELS, stages=(0, 1, 2, 3), worlds=(1, 2, 4), **kw) -> list[dict]:
    """Rows for every model x stage x N_d (N_d 1 only at stage 0), measured with ``TRUE_OVERHEADS``: real runs,
    but stage 2 at N_d = 4 simulated (no NCCL), so the communicator term can be told from the CUDA context."""
    rows = []
    forced = kw.pop("simulated", None)
    for model in models:
        for world in worlds:
            for stage in stages:
                if world == 1 and stage:
                    continue
                simulated = forced if forced is not None else (stage == 2 and world == 4)
                rows.append(synthetic_row(make_setup(model, stage, world, grad_ckpt=(stage == 1)),
                                          simulated=simulated, **kw))
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path



@pytest.mark.parametrize("adapters, training", [
    ({}, "full"), ({"lora_rank": 8}, "lora"), ({"freeze": "embeddings"}, "freeze"),
    ({"lora_rank": 8, "base_quant": "nf4"}, "qlora"),
])
def test_errors_are_broken_down_by_way_of_training(adapters, training):
    from types import SimpleNamespace

    from zeroest.estimator.core.adapters import Adapters

    from zeroest.report.analysis import DIMENSIONS

    record = SimpleNamespace(setup=SimpleNamespace(adapters=Adapters(**adapters)))
    assert DIMENSIONS["training"](record) == training


@pytest.mark.parametrize("expandable, allocator", [(False, "default"), (True, "expandable segments")])
def test_errors_are_broken_down_by_allocator(expandable, allocator):
    from types import SimpleNamespace

    from zeroest.report.analysis import DIMENSIONS

    assert DIMENSIONS["allocator"](SimpleNamespace(setup=SimpleNamespace(expandable_segments=expandable))) == allocator

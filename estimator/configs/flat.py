"""TrainingSetup to and from a flat JSON dict: the "setup" of predict's JSON, of grids and of runs.jsonl rows.

Keys are named as predict's flags are (``micro_batch`` for ``--micro-batch``). ``model`` is a preset name or a
config path; ``setup_from_dict`` loads it again, so a row can be re-estimated with the current estimator.
"""

from __future__ import annotations

import difflib

from zeroest.estimator.core.setup import Optimizer, Parallelism, TrainingSetup, Workload, ZeroConfig
from zeroest.estimator.core.shape import ModelShape

_ZERO_KEYS = (
    "overlap_comm", "contiguous_gradients", "reduce_bucket_size", "allgather_bucket_size", "prefetch_bucket_size",
    "max_live_parameters", "param_persistence_threshold", "sub_group_size", "offload_optimizer", "offload_params",
    "pin_memory", "zero_init",
)
_WORKLOAD_KEYS = ("micro_batch", "seq_len", "grad_accum", "grad_ckpt", "attn", "activations")
SETUP_KEYS: tuple[str, ...] = (
    "model", "stage", "world_size", "gpus_per_node", "nodes", "dtype", "optimizer", "optimizer_impl", "mode",
    *_WORKLOAD_KEYS, *_ZERO_KEYS,
)


def setup_to_dict(setup: TrainingSetup) -> dict:
    """The flat dict of a setup (JSON-ready; ``world_size`` is derived and informative only)."""
    out: dict = {
        "model": setup.model.name,
        "stage": int(setup.stage),
        "world_size": setup.world_size,
        "gpus_per_node": setup.parallel.gpus_per_node,
        "nodes": setup.parallel.nodes,
        "dtype": setup.dtype,
        "optimizer": setup.optimizer.name,
        "optimizer_impl": setup.optimizer.impl,
        "mode": setup.mode,
    }
    out.update({key: getattr(setup.workload, key) for key in _WORKLOAD_KEYS})
    out.update({key: getattr(setup.zero, key) for key in _ZERO_KEYS})
    out["overlap_comm"] = setup.zero.overlap
    return out


def _stage(value, where: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: stage must be 0, 1, 2 or 3, got {value!r}") from None


def check_keys(data: dict, where: str = "setup") -> None:
    """Raise ValueError for the first unknown key, naming the nearest known one."""
    for key in data:
        if key not in SETUP_KEYS:
            near = difflib.get_close_matches(str(key), SETUP_KEYS, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; known keys: {', '.join(SETUP_KEYS)}"
            raise ValueError(f"unknown key {key!r} in {where}{hint}")


def setup_from_dict(data: dict, model: ModelShape | None = None, where: str = "setup") -> TrainingSetup:
    """Build a TrainingSetup from a flat dict; missing keys take zeroest's defaults.

    ``model`` overrides loading ``data["model"]`` (a ModelShape already in hand). ``world_size`` may stand in for
    ``gpus_per_node`` (one node); if both are given they must agree.
    """
    check_keys(data, where)
    if model is None:
        from zeroest.estimator.catalog.models import load_model

        if "model" not in data:
            raise ValueError(f"{where} names no model: add model: <preset or config.json path>")
        model = load_model(str(data["model"]))
    nodes = int(data.get("nodes", 1))
    gpus = data.get("gpus_per_node")
    if gpus is None:
        world = int(data.get("world_size", nodes))
        if world % nodes:
            raise ValueError(f"{where}: world_size {world} is not a multiple of nodes {nodes}")
        gpus = world // nodes
    elif "world_size" in data and int(data["world_size"]) != int(gpus) * nodes:
        raise ValueError(f"{where}: world_size {data['world_size']} != gpus_per_node {gpus} x nodes {nodes}")
    zero = ZeroConfig(stage=_stage(data.get("stage", 0), where), **{k: data[k] for k in _ZERO_KEYS if k in data})
    return TrainingSetup(
        model=model,
        parallel=Parallelism(gpus_per_node=int(gpus), nodes=nodes),
        dtype=data.get("dtype", "bf16"),
        optimizer=Optimizer(name=data.get("optimizer", "adamw"), impl=data.get("optimizer_impl", "fused")),
        zero=zero,
        workload=Workload(**{k: data[k] for k in _WORKLOAD_KEYS if k in data}),
        mode=data.get("mode", "deepspeed"),
    )

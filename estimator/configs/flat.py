"""TrainingSetup to and from a flat JSON dict: the "setup" of predict's JSON, of grids and of runs.jsonl rows.

The keys are the setup's fields that carry a flag (``core.setup.axis``), named as the CLI's parameters are
(``micro_batch`` for ``--micro-batch``), plus ``model`` (a preset name or a config path; ``setup_from_dict`` loads
it again, so a row can be re-estimated with the current estimator) and ``world_size`` (derived, informative). The
key list is read off the dataclasses, so a new field is a new key with no change here.
"""

from __future__ import annotations

from dataclasses import fields
from enum import Enum

from zeroest.estimator.core.adapters import Adapters
from zeroest.estimator.core.setup import Optimizer, Parallelism, TrainingSetup, Workload, ZeroConfig
from zeroest.estimator.core.shape import ModelShape
from zeroest.estimator.core.vocab import MEASURED_BEFORE_KEY

PARTS: dict[str, type] = {"parallel": Parallelism, "optimizer": Optimizer, "zero": ZeroConfig,
                          "workload": Workload, "adapters": Adapters}
"""The parts of a TrainingSetup, by attribute name."""


def axes() -> list[tuple[str, str | None, object]]:
    """(flat key, part attribute or None for TrainingSetup itself, dataclass field) of every flagged field."""
    out = []
    for part, cls in (None, TrainingSetup), *PARTS.items():
        for f in fields(cls):
            if "flag" in f.metadata:
                out.append((f.metadata["key"] or f.name, part, f))
    return out


SETUP_KEYS: tuple[str, ...] = ("model", "world_size", *(key for key, _, _ in axes()))


def _plain(value):
    if isinstance(value, Enum):
        return value.value
    return value


def setup_to_dict(setup: TrainingSetup) -> dict:
    """The flat dict of a setup (JSON-ready; ``world_size`` is derived and informative only; ``overlap_comm``
    is DeepSpeed's resolved value)."""
    out: dict = {"model": setup.model.name, "world_size": setup.world_size}
    for key, part, f in axes():
        owner = setup if part is None else getattr(setup, part)
        out[key] = int(owner.stage) if key == "stage" else _plain(getattr(owner, f.name))
    out["overlap_comm"] = setup.zero.overlap
    return out


def check_keys(data: dict, where: str = "setup") -> None:
    """Raise ValueError for the first unknown key, naming the nearest known one."""
    for key in data:
        if key not in SETUP_KEYS:
            import difflib  # for the suggestion only: kept off start-up

            near = difflib.get_close_matches(str(key), SETUP_KEYS, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; known keys: {', '.join(SETUP_KEYS)}"
            raise ValueError(f"unknown key {key!r} in {where}{hint}")


_COUNTS = {"nodes": ("the number of nodes", "--nodes"), "gpus_per_node": ("the number of GPUs per node", "--gpus"),
           "world_size": ("the world size", "world_size")}


def _count(data: dict, key: str, default: int, where: str) -> int:
    """A rank or node count of the flat dict as a positive int; ValueError naming the key, not ``int()``'s."""
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).strip().isdigit() or \
            int(value) < 1:
        name, flag = _COUNTS[key]
        raise ValueError(f"{where + ': ' if where else ''}{name} must be a positive whole number, got {value!r} "
                         f"(set {flag} to 1 or more)")
    return int(value)


def _layout(data: dict, where: str) -> tuple[int, int]:
    nodes = _count(data, "nodes", 1, where)
    if "gpus_per_node" not in data:
        world = _count(data, "world_size", nodes, where)
        if world % nodes:
            raise ValueError(f"{where}: world_size {world} is not a multiple of nodes {nodes}")
        return world // nodes, nodes
    gpus = _count(data, "gpus_per_node", 1, where)
    if "world_size" in data and _count(data, "world_size", 1, where) != gpus * nodes:
        raise ValueError(f"{where}: world_size {data['world_size']} != gpus_per_node {gpus} x nodes {nodes}")
    return gpus, nodes


def setup_from_dict(data: dict, model: ModelShape | None = None, where: str = "setup") -> TrainingSetup:
    """Build a TrainingSetup from a flat dict; missing keys (and None values) take the setup's defaults and
    ``vocab``'s rules (the optimizer implementation follows the optimizer and offload).

    ``model`` overrides loading ``data["model"]`` (a ModelShape already in hand). ``world_size`` may stand in for
    ``gpus_per_node`` (one node); if both are given they must agree.
    """
    check_keys(data, where)
    if model is None:
        from zeroest.estimator.catalog.models import load_model

        if "model" not in data:
            raise ValueError(f"{where} names no model: add model: <preset or config.json path>")
        model = load_model(str(data["model"]))
    given = {key: value for key, value in data.items() if value is not None}
    if isinstance(given.get("gpu_memory_bytes"), str):  # a preset or a size with its unit: 4090, 24GB
        from zeroest.estimator.catalog.gpus import parse_gpu

        try:
            given["gpu_memory_bytes"] = parse_gpu(given["gpu_memory_bytes"]).memory_bytes
        except ValueError as exc:
            raise ValueError(f"{where}: gpu_memory_bytes: {exc}" if where else str(exc)) from None
    gpus, nodes = _layout(given, where)
    given.update(gpus_per_node=gpus, nodes=nodes)
    kwargs: dict = {name: {} for name in PARTS}
    top: dict = {}
    for key, part, f in axes():
        if key in given:
            (top if part is None else kwargs[part])[f.name] = given[key]
    try:
        parts = {name: PARTS[name](**values) for name, values in kwargs.items()}
        return TrainingSetup(model=model, **parts, **top)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}" if where else str(exc)) from None


def setup_from_row(data: dict, model: ModelShape | None = None, where: str = "row") -> TrainingSetup:
    """The setup a measured runs.jsonl row ran: ``setup_from_dict``, except that a key the row lacks (or holds as
    None) because the row was written before the key existed takes what the row was measured with
    (``vocab.MEASURED_BEFORE_KEY``: ``loop`` trainer), not the default a user gets for leaving the flag out."""
    given = {key: value for key, value in data.items() if value is not None}
    return setup_from_dict({**MEASURED_BEFORE_KEY, **given}, model=model, where=where)

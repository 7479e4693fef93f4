"""Grids of setups to validate: ``--grid quick|default|FILE`` (YAML or JSON), ``--set key=value`` overrides.

A grid file is either a list of setups or a mapping::

    models:                 # optional: HF config dicts by name (tiny test models that are no preset)
      tiny-gpt2: {model_type: gpt2, n_layer: 2, n_embd: 128, n_head: 4, vocab_size: 4096}
    defaults: {model: gpt2, dtype: bf16, micro_batch: 2}
    runs:
      - {stage: 0}
      - {stage: 3, world_size: 4, simulate: true}

Setup keys are ``estimator.configs.flat.SETUP_KEYS`` (predict's flags, ``micro_batch`` for ``--micro-batch``);
the one extra key ``simulate: true`` (in an entry or under ``defaults:``) runs the setup as rank 0 of a
``world_size``-rank job on a fake process group. An unknown key is a ValueError naming the file, the line and
the nearest known key. JSON is parsed by the same YAML reader (YAML is a superset of JSON), so JSON files get
line numbers too.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from zeroest.estimator.catalog.files import data_path
from zeroest.estimator.configs.flat import SETUP_KEYS

RUN_KEYS: tuple[str, ...] = ("simulate",)
"""Keys of a grid entry that are not setup keys."""
ENTRY_KEYS: tuple[str, ...] = (*SETUP_KEYS, *RUN_KEYS)
TOP_KEYS: tuple[str, ...] = ("models", "defaults", "runs")


@dataclass(frozen=True, kw_only=True)
class GridEntry:
    """One setup of a grid, before it is turned into a TrainingSetup."""

    setup: dict
    """Flat setup dict (defaults merged, overrides applied)."""
    simulate: bool = False
    """Run as rank 0 of a ``world_size``-rank job on the fake process group."""
    where: str = ""
    """``file:line`` of the entry, for messages."""


@dataclass(frozen=True, kw_only=True)
class Grid:
    """A loaded grid: its entries and the model configs it defines inline."""

    entries: tuple[GridEntry, ...]
    """Setups in file order."""
    models: dict[str, dict] = field(default_factory=dict)
    """HF config dicts by model name, from the grid's ``models:`` section."""
    source: str = ""
    """Where the grid came from."""


def _grids_dir() -> Path:
    """``data/grids`` of the ``zeroest.data`` package."""
    return data_path("grids")


def builtin_grids() -> list[str]:
    """Names of the grids shipped in data/grids, sorted."""
    return sorted(path.stem for path in _grids_dir().glob("*.yaml"))


def _unknown(key: object, known: tuple[str, ...], where: str) -> ValueError:
    near = difflib.get_close_matches(str(key), known, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else f"; known keys: {', '.join(known)}"
    return ValueError(f"{where}: unknown key {key!r}{hint}")


def _check_mapping(node: yaml.Node, known: tuple[str, ...], source: str, what: str) -> None:
    if not isinstance(node, yaml.MappingNode):
        raise ValueError(f"{source}:{node.start_mark.line + 1}: {what} must be a mapping of key: value")
    for key_node, _ in node.value:
        if key_node.value not in known:
            raise _unknown(key_node.value, known, f"{source}:{key_node.start_mark.line + 1}")


def _check_nodes(root: yaml.Node, source: str) -> list[int]:
    """Check every key against the known ones; return the line of each run entry."""
    runs = root
    if isinstance(root, yaml.MappingNode):
        _check_mapping(root, TOP_KEYS, source, "the grid")
        sections = {k.value: v for k, v in root.value}
        if "defaults" in sections:
            _check_mapping(sections["defaults"], ENTRY_KEYS, source, "defaults")
        if "runs" not in sections:
            raise ValueError(f"{source}: the grid has no runs: add a 'runs:' list of setups")
        runs = sections["runs"]
    if not isinstance(runs, yaml.SequenceNode):
        raise ValueError(f"{source}:{runs.start_mark.line + 1}: runs must be a list of setups")
    for item in runs.value:
        _check_mapping(item, ENTRY_KEYS, source, "each run")
    return [item.start_mark.line + 1 for item in runs.value]


def parse_grid(text: str, source: str = "<grid>") -> Grid:
    """A Grid from YAML or JSON text; ValueError (with ``source:line``) for anything malformed or unknown."""
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{source}{line}: not valid YAML/JSON ({getattr(err, 'problem', err)})") from None
    if root is None:
        raise ValueError(f"{source}: the grid is empty: list setups under 'runs:'")
    lines = _check_nodes(root, source)
    if isinstance(data, list):
        data = {"runs": data}
    defaults = data.get("defaults") or {}
    models = data.get("models") or {}
    for name, config in models.items():
        if not isinstance(config, dict) or "model_type" not in config:
            raise ValueError(
                f"{source}: model {name!r} under models: must be an HF config dict with a model_type"
            )
    if not data["runs"]:
        raise ValueError(f"{source}: runs: is an empty list, so there is nothing to validate: list setups under it")
    entries = []
    for line, item in zip(lines, data["runs"], strict=True):
        item = {**defaults, **item}
        simulate = bool(item.pop("simulate", False))
        entries.append(GridEntry(setup=item, simulate=simulate, where=f"{source}:{line}"))
    return Grid(entries=tuple(entries), models=dict(models), source=source)


def load_grid(name_or_path: str) -> Grid:
    """A grid shipped in data/grids (``quick``, ``default``, ``holdout``, ...) by name, or a YAML/JSON file."""
    entry = _grids_dir() / f"{name_or_path}.yaml"
    if "/" not in name_or_path and entry.is_file():
        return parse_grid(entry.read_text(encoding="utf-8"), f"{name_or_path}.yaml")
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise ValueError(
            f"grid {name_or_path!r} is neither a built-in grid ({', '.join(builtin_grids())}) nor a file: "
            "pass --grid quick, --grid default or a YAML/JSON path"
        )
    return parse_grid(path.read_text(encoding="utf-8"), str(path))


def load_grids(names: list[str]) -> Grid:
    """Several grids (``--grid`` given more than once) as one: their entries in order, their models merged; a
    model name two grids define differently is an error."""
    grids = [load_grid(name) for name in names]
    models: dict[str, dict] = {}
    for grid in grids:
        for name, config in grid.models.items():
            if models.get(name, config) != config:
                raise ValueError(f"model {name!r} is defined differently in {grid.source} and an earlier grid: "
                                 "rename it in one of them")
            models[name] = config
    return Grid(entries=tuple(e for g in grids for e in g.entries), models=models,
                source=" + ".join(g.source for g in grids))


def parse_override(text: str) -> tuple[str, object]:
    """``key=value`` from ``--set``; the value is read as YAML (``4`` is an int, ``true`` a bool)."""
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise ValueError(f"--set {text!r}: expected key=value, e.g. --set micro_batch=4")
    if key not in ENTRY_KEYS:
        raise _unknown(key, ENTRY_KEYS, f"--set {text!r}")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(grid: Grid, overrides: list[str], simulate_sizes: list[int]) -> list[GridEntry]:
    """Entries with ``--set`` applied to each, plus simulated copies at each ``--simulate-world-size``."""
    pairs = [parse_override(text) for text in overrides]
    entries = []
    for entry in grid.entries:
        setup, simulate = dict(entry.setup), entry.simulate
        for key, value in pairs:
            if key == "simulate":
                simulate = bool(value)
            else:
                setup[key] = value
                if key == "world_size":
                    setup.pop("gpus_per_node", None)
        entries.append(GridEntry(setup=setup, simulate=simulate, where=entry.where))
    for size in simulate_sizes:
        for entry in list(entries[: len(grid.entries)]):
            setup = {k: v for k, v in entry.setup.items() if k not in ("gpus_per_node", "nodes")}
            entries.append(GridEntry(setup={**setup, "world_size": size}, simulate=True, where=entry.where))
    return entries

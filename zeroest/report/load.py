"""The rows of runs files a report can use, the rest listed with why, and measured ZeRO reductions.

Rows are read by ``zeroest.report.runs`` (the schema; a malformed line is an error there). A well-formed row is
still skipped here, with the reason, when it is of another zeroest version or its run did not finish (status
error, timeout, crashed), or when a later row measured the same run again (``_latest``: the same setup as the
current estimator reads it, ``setup_identity``). Like ``runs``, this module needs no torch or numpy (the estimator's
setup and model readers only, imported where a row is identified), so the claims command reads measured
reductions cheaply (``measured_reductions``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from zeroest.report.runs import read_numbered, row_problem, runs_files

if TYPE_CHECKING:
    from zeroest.estimator.core.shape import ModelShape

log = logging.getLogger(__name__)

USABLE_STATUSES = ("ok", "oom")
SHAPE_KEYS: tuple[str, ...] = (
    "model", "micro_batch", "seq_len", "grad_accum", "grad_ckpt", "dtype", "optimizer", "optimizer_impl",
    "attn",
)
"""Setup keys that must agree for two runs to be the same model and shape (stage and N_d may differ)."""


@dataclass(frozen=True, kw_only=True)
class Skipped:
    """A row that was not used, and why."""

    where: str
    """``path:line``."""
    reason: str


@dataclass(frozen=True, kw_only=True)
class RunRow:
    """One usable row of a runs.jsonl: one rank of one run."""

    source: Path
    """The runs.jsonl it came from (model config paths are resolved against its folder)."""
    line: int
    data: dict
    """The row as written (schema: ``zeroest.report.runs``)."""

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    @property
    def run_key(self) -> str:
        return str(self.data["run_key"])


@dataclass(frozen=True, kw_only=True)
class LoadedRuns:
    """What ``load_runs`` read."""

    files: tuple[Path, ...]
    rows: tuple[RunRow, ...]
    skipped: tuple[Skipped, ...]


def _unusable(row: dict, version: str | None) -> str | None:
    """Why a well-formed row cannot be compared, or None."""
    if version is not None and row["zeroest_version"] != version:
        return (f"written by zeroest {row['zeroest_version']}, this is zeroest {version}: the estimate "
                "may have changed since; measure again with this version")
    problem = row_problem(row)  # the reader checked rows of this version only
    if problem:
        return f"written by zeroest {row['zeroest_version']} and not in this version's schema: {problem}"
    if row["status"] not in USABLE_STATUSES and not row["measured"].get("oom"):
        error = str(row.get("error") or "no error recorded").splitlines()[0][:160]
        return f"run status {row['status']}: {error}"
    return None


def resolve_model(name: str, source: Path) -> str:
    """The model as written, or a config file next to the runs file (validate writes inline models to
    models/)."""
    from zeroest.estimator.catalog.models import list_presets

    if name.strip().lower() in list_presets() or Path(name).expanduser().exists():
        return name
    base = Path(name).name
    folder = source.parent
    for candidate in (folder / name, folder / "models" / base, folder / "models" / f"{base}.json"):
        if candidate.exists():
            return str(candidate)
    return name


@functools.lru_cache(maxsize=256)
def read_model(name_or_path: str) -> tuple[ModelShape, str]:
    """(the model's shape, what the model is: its config, ``catalog.models.load_config``), read once per model:
    validate writes an inline model to OUT/models/<name>.json, a path that differs between runs of the same
    model, so the config, not the path, names it; ``report.join`` takes the shape from here too. ValueError (or
    OSError) for a model that cannot be read."""
    from zeroest.estimator.catalog.models import load_config
    from zeroest.estimator.core.architecture import shape_from_config

    label, config = load_config(name_or_path)
    return shape_from_config(config, label), json.dumps(config, sort_keys=True)


def setup_identity(row: RunRow) -> str:
    """The run a row measured, as the current estimator reads its setup: the flat setup with every key filled
    (a key the row was written before takes what it was measured with, ``configs.flat.setup_from_row``; the
    rest their defaults), the model by its config (``read_model``), the process group, the launcher and
    the device. Two rows of one setup are then one run although the older was written before a key existed
    (its stored ``run_key`` hashes the keys of its day). The stored ``run_key`` where the setup cannot be
    rebuilt (the report skips such a row later, with the reason)."""
    from zeroest.estimator.configs.flat import setup_from_row, setup_to_dict

    data = row.data["setup"]
    try:
        model, what = read_model(resolve_model(str(data.get("model", "")), row.source))
        flat = setup_to_dict(setup_from_row(data, model=model, where=row.where))
    except (ValueError, OSError, KeyError, TypeError):
        return row.run_key
    flat["model"] = what
    blob = json.dumps({"setup": flat, "simulated": bool(row.data.get("simulated")),
                       "launcher": row.data.get("launcher"), "device": "cuda" if row.data.get("gpu") else "cpu"},
                      sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _measured_as(row: RunRow) -> tuple:
    """What makes two rows measurements of one thing: the run (``setup_identity``: setup, process group,
    launcher, device), the rank, and the GPU it ran on (a run key does not name the GPU)."""
    gpu = row.data.get("gpu") or {}
    return setup_identity(row), row.data.get("rank"), gpu.get("name") if isinstance(gpu, dict) else None


def _latest(rows: list[RunRow]) -> tuple[list[RunRow], list[Skipped]]:
    """One row per measured thing (``_measured_as``): the one that finished last; the older are skipped, named
    with the row that supersedes them (a run measured again: ``validate --redo``, or a re-measurement kept in
    another folder)."""
    newest: dict[tuple, RunRow] = {}
    keys = [_measured_as(row) for row in rows]
    for row, key in zip(rows, keys, strict=True):
        if key not in newest or str(row.data.get("finished_at") or "") >= str(newest[key].data.get(
                "finished_at") or ""):
            newest[key] = row
    kept = [row for row, key in zip(rows, keys, strict=True) if newest[key] is row]
    skipped = [Skipped(where=row.where, reason=f"superseded by {newest[key].where}, the same run "
                       f"measured again at {newest[key].data.get('finished_at')}")
               for row, key in zip(rows, keys, strict=True) if newest[key] is not row]
    return kept, skipped


def load_runs(paths: Sequence[str | Path], version: str | None = None) -> LoadedRuns:
    """Rows of every runs file under ``paths``; rows of another zeroest ``version`` (when given) and of runs
    that did not finish are skipped, and so is a row measured again later (``_latest``). ValueError for a missing
    path, ``RunsFileError`` for a malformed line."""
    files = runs_files(paths)
    rows: list[RunRow] = []
    skipped: list[Skipped] = []
    for path in files:
        for number, data in read_numbered(path):
            problem = _unusable(data, version)
            if problem:
                skipped.append(Skipped(where=f"{path}:{number}", reason=problem))
            else:
                rows.append(RunRow(source=path, line=number, data=data))
    rows, superseded = _latest(rows)
    return LoadedRuns(files=tuple(files), rows=tuple(rows), skipped=(*skipped, *superseded))


def is_oom(row: RunRow) -> bool:
    """The run ran out of memory (``measured.oom`` names the phase)."""
    return bool(row.data["measured"].get("oom")) or row.data["status"] == "oom"


def shape_key(setup: dict) -> tuple:
    """The model and shape of a setup (``SHAPE_KEYS``), model given by its file or preset name."""
    model = str(setup.get("model", "?")).rsplit("/", 1)[-1].removesuffix(".json")
    return (model, *(setup.get(k) for k in SHAPE_KEYS[1:]))


def worst_ranks(rows: Iterable[RunRow]) -> list[RunRow]:
    """One row per run: the rank with the largest measured peak allocated (order of first appearance)."""
    best: dict[str, RunRow] = {}
    for row in rows:
        current = best.get(row.run_key)
        peak = row.data["measured"].get("peak_allocated_bytes") or 0
        if current is None or peak > (current.data["measured"].get("peak_allocated_bytes") or 0):
            best[row.run_key] = row
    return list(best.values())


@dataclass(frozen=True, kw_only=True)
class ReductionPoint:
    """Measured peak allocated of one stage over stage 0 at one N_d, same model and shape."""

    shape: tuple
    """``shape_key`` of the runs."""
    world_size: int
    stage: int
    peak_allocated_bytes: int
    stage0_peak_allocated_bytes: int
    simulated: bool
    """The stage's run used a fake process group (real runs are preferred where both exist)."""

    @property
    def reduction(self) -> float:
        return self.stage0_peak_allocated_bytes / self.peak_allocated_bytes


def reduction_points(rows: Iterable[RunRow]) -> list[ReductionPoint]:
    """Every measured stage's reduction over stage 0 at the same N_d and shape (no offload, no OOM runs)."""
    peaks: dict[tuple, dict[int, tuple[int, bool]]] = {}
    for row in worst_ranks(r for r in rows if not is_oom(r)):
        setup, measured = row.data["setup"], row.data["measured"]
        peak = measured.get("peak_allocated_bytes") or 0
        offload = setup.get("offload_optimizer", "none") != "none"
        if peak <= 0 or offload or setup.get("mode", "deepspeed") != "deepspeed":
            continue
        simulated = bool(row.data["simulated"])
        slot = peaks.setdefault((shape_key(setup), int(setup["world_size"])), {})
        stage = int(setup["stage"])
        if stage not in slot or (slot[stage][1] and not simulated):
            slot[stage] = (int(peak), simulated)
    points = []
    for (shape, world), by_stage in sorted(peaks.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        if 0 not in by_stage:
            continue
        for stage, (peak, simulated) in sorted(by_stage.items()):
            points.append(ReductionPoint(shape=shape, world_size=world, stage=stage,
                                         peak_allocated_bytes=peak, simulated=simulated,
                                         stage0_peak_allocated_bytes=by_stage[0][0]))
    return points


def measured_reductions(runs_path: str | Path | Sequence[str | Path],
                        model: str | None = None) -> dict[str, float]:
    """``{"<stage>@<N_d>": measured reduction of peak allocated over stage 0}`` for one model and shape.

    Reductions are of the whole measured peak (activations included), worst rank of each run, runs without
    offload. ``model`` picks the model (preset or file name); with several shapes left, the one with the most
    measured points is used and the choice is logged. ValueError when the path holds no usable rows.
    """
    paths = [runs_path] if isinstance(runs_path, (str, Path)) else list(runs_path)
    loaded = load_runs(paths)
    for skip in loaded.skipped:
        log.info("skipped %s: %s", skip.where, skip.reason)
    if not loaded.rows:
        raise ValueError(f"no usable runs in {', '.join(map(str, paths))}: run zeroest validate first")
    points = [p for p in reduction_points(loaded.rows) if model is None or p.shape[0] == model]
    if not points:
        return {}
    counts: dict[tuple, int] = {}
    for p in points:
        counts[p.shape] = counts.get(p.shape, 0) + 1
    shape = max(counts, key=lambda s: (counts[s], str(s)))
    if len(counts) > 1:
        log.info("measured reductions of %s (%d points); other shapes: %s", shape, counts[shape],
                 ", ".join(str(s) for s in counts if s != shape))
    return {f"{p.stage}@{p.world_size}": p.reduction for p in points if p.shape == shape}

"""Reading runs.jsonl tolerantly: every usable row kept, every other one listed with why it was skipped.

A runs.jsonl (written by ``zeroest validate``, see validate/results.py) has one JSON object per rank per run.
This module knows only JSON: it needs no estimator, torch or DeepSpeed, so the claims command can read
measured reductions cheaply (``measured_reductions``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

USABLE_STATUSES = ("ok", "oom")
SHAPE_KEYS: tuple[str, ...] = (
    "model", "micro_batch", "seq_len", "grad_accum", "grad_ckpt", "dtype", "optimizer", "optimizer_impl",
    "attn",
)
"""Setup keys that must agree for two runs to be the same model and shape (stage and N_d may differ)."""


def default_runs_dir() -> Path:
    """data/runs of the working directory when there is one, else of this checkout."""
    here = Path("data/runs")
    return here if here.is_dir() else Path(__file__).resolve().parents[2] / "data" / "runs"


@dataclass(frozen=True, kw_only=True)
class Skipped:
    """A row (or file) that was not used, and why."""

    where: str
    """``path:line`` (or the path alone for a whole file)."""
    reason: str


@dataclass(frozen=True, kw_only=True)
class RunRow:
    """One usable row of a runs.jsonl: one rank of one run."""

    source: Path
    """The runs.jsonl it came from (model config paths are resolved against its folder)."""
    line: int
    data: dict
    """The row as written: setup, rank, simulated, status, prediction, measured, versions, gpu or cpu, ..."""

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    @property
    def run_key(self) -> str:
        """validate's run key, or one made from the file and the setup for rows written without it."""
        key = self.data.get("run_key")
        if key:
            return str(key)
        blob = json.dumps({"setup": self.data["setup"], "simulated": bool(self.data.get("simulated"))},
                          sort_keys=True)
        return f"{self.source}#{blob}"


@dataclass(frozen=True, kw_only=True)
class LoadedRuns:
    """What ``load_runs`` read."""

    files: tuple[Path, ...]
    rows: tuple[RunRow, ...]
    skipped: tuple[Skipped, ...]


def runs_files(paths: Iterable[str | Path]) -> list[Path]:
    """The .jsonl files named, or found (recursively) under the folders named; ValueError for a missing
    path."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            files += sorted(path.rglob("*.jsonl"))
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"runs path {str(raw)!r} does not exist: pass a runs.jsonl or a folder of them")
    return list(dict.fromkeys(files))


def _row_problem(row: object, version: str | None) -> str | None:
    """Why a parsed row cannot be used, or None."""
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object"
    if version is not None and str(row.get("zeroest_version")) != version:
        return (f"written by zeroest {row.get('zeroest_version')}, this is zeroest {version}: the estimate "
                "may have changed since; measure again with this version")
    if not isinstance(row.get("setup"), dict):
        return "no setup object"
    measured = row.get("measured")
    if not isinstance(measured, dict):
        return "no measured object"
    status = row.get("status", "oom" if measured.get("oom") else "ok")
    if status not in USABLE_STATUSES and not measured.get("oom"):
        error = str(row.get("error") or "no error recorded").splitlines()[0][:160]
        return f"run status {status}: {error}"
    return None


def load_runs(paths: Sequence[str | Path], version: str | None = None) -> LoadedRuns:
    """Rows of every runs file under ``paths``; rows of another zeroest ``version`` (when given) are
    skipped."""
    files = runs_files(paths)
    rows: list[RunRow] = []
    skipped: list[Skipped] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            skipped.append(Skipped(where=str(path), reason=f"cannot be read: {exc}"))
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                why = f"not valid JSON ({exc.msg}); a run cut off while writing?"
                skipped.append(Skipped(where=where, reason=why))
                continue
            problem = _row_problem(row, version)
            if problem:
                skipped.append(Skipped(where=where, reason=problem))
            else:
                rows.append(RunRow(source=path, line=number, data=row))
    return LoadedRuns(files=tuple(files), rows=tuple(rows), skipped=tuple(skipped))


def is_oom(row: RunRow) -> bool:
    """The run ran out of memory (``measured.oom`` names the phase)."""
    return bool(row.data["measured"].get("oom")) or row.data.get("status") == "oom"


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
        simulated = bool(row.data.get("simulated"))
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

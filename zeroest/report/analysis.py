"""What ``zeroest report`` computes: predictions under each set of overheads, errors, breakdowns, fits.

Bases (sets of predictions compared with the measurements):

* ``stored``: the prediction written at run time (drift shows what changed in the estimator since);
* ``current``: the current estimator with the overheads predict would use (the group's calibration, else
  defaults);
* with ``--fit``: ``defaults`` (before the fit), ``in_sample`` (fitted on all rows of the group) and
  ``held_out`` (each row predicted with overheads fitted without its model: grouped k-fold cross-validation).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from zeroest.estimator.core.overheads import Overheads
from zeroest.report.bounds import Bound, conservative_overheads
from zeroest.report.errors import ErrorStats, error_stats, grouped_stats
from zeroest.report.fit import QUANTITIES, CrossValidation, FitResult, cross_validate, fit_overheads
from zeroest.report.join import PHASES, Environment, Prediction, Record, join_rows, overheads_for, predict
from zeroest.report.load import Skipped, load_runs

log = logging.getLogger(__name__)

BASES: tuple[str, ...] = ("stored", "current", "defaults", "in_sample", "held_out")
BASIS_TITLES = {"stored": "stored at run time", "current": "current estimator", "defaults": "before the fit",
                "in_sample": "fitted, in sample", "held_out": "fitted, held out by model"}


@dataclass(frozen=True, kw_only=True)
class GroupFit:
    """The fit of one GPU x torch x DeepSpeed group."""

    group: str
    env: Environment
    models: tuple[str, ...]
    rows: int
    result: FitResult
    cv: CrossValidation | None
    """None with fewer than two models: then only in-sample errors exist, and ``cv_note`` says so."""
    cv_note: str | None
    path: Path | None = None
    """The calibration file written (None for CPU groups, which predict never uses)."""
    bound: Bound | None = None
    """Overheads that never under-predict this group's rows (``report.bounds``), from its in-sample fit."""


@dataclass(frozen=True, kw_only=True)
class Analysis:
    """Everything the report renders."""

    files: tuple[Path, ...]
    records: tuple[Record, ...]
    skipped: tuple[Skipped, ...]
    predictions: dict[str, dict[str, Prediction]]
    """basis -> record key -> prediction (a basis lacks records it has no prediction for)."""
    fits: tuple[GroupFit, ...] = ()

    @property
    def compared(self) -> list[Record]:
        """Records that ran to the end (OOM runs are reported apart: their peaks stop short)."""
        return [r for r in self.records if r.oom is None]

    @property
    def ooms(self) -> list[Record]:
        return [r for r in self.records if r.oom is not None]

    @property
    def bases(self) -> list[str]:
        return [b for b in BASES if self.predictions.get(b)]

    @property
    def primary(self) -> str:
        """The basis headline numbers use: held out when a fit could be cross-validated, else the best there
        is."""
        for basis in ("held_out", "in_sample", "current"):
            if self.predictions.get(basis):
                return basis
        return "current"

    def error(self, record: Record, basis: str, quantity: str) -> float | None:
        """Signed relative error of ``quantity`` (or ``phase:<name>``) of one record under ``basis``."""
        prediction = self.predictions.get(basis, {}).get(record.key)
        if prediction is None or record.oom is not None:
            return None
        return record.errors(prediction).get(quantity)

    def stats(self, basis: str, quantity: str, records: Sequence[Record] | None = None) -> ErrorStats:
        rows = self.compared if records is None else records
        return error_stats(self.error(r, basis, quantity) for r in rows)

    @property
    def runs(self) -> int:
        """Distinct runs among the records."""
        return len({r.row.run_key for r in self.records})


def _fit_group(group: str, records: list[Record], k: int) -> GroupFit:
    samples = [r.sample for r in records]
    models = tuple(sorted({s.group for s in samples}))
    result = fit_overheads(samples, Overheads())
    bound = conservative_overheads(samples, result.overheads) if records[0].env.gpu_name else None
    if len(models) < 2:
        note = (f"only one model ({models[0]}) was measured on {group}: cross-validation by model is "
                "impossible, "
                "so only in-sample errors are reported; measure a second model to see held-out errors")
        return GroupFit(group=group, env=records[0].env, models=models, rows=len(records), result=result,
                        cv=None, cv_note=note, bound=bound)
    cv = cross_validate(samples, Overheads(), k)
    return GroupFit(group=group, env=records[0].env, models=models, rows=len(records), result=result, cv=cv,
                    cv_note=None, bound=bound)


def _predict_all(records: Sequence[Record],
                 choose: Callable[[Record], Overheads | None]) -> dict[str, Prediction]:
    out = {}
    for r in records:
        oh = choose(r)
        if oh is not None:
            out[r.key] = predict(r.setup, overheads_for(r.env, r.simulated, oh), simulated=r.simulated, cpu=r.cpu)
    return out


POOLED_PREFIX = "pooled: "
"""The name of the one fit group of ``analyze(..., pool=True)`` begins with it (then the groups it holds)."""


def analyze(paths: Sequence[str | Path], *, fit: bool = False, k: int = 5,
            version: str | None = None, calibration: Overheads | None = None, pool: bool = False) -> Analysis:
    """Load, join and (with ``fit``) fit; ValueError when nothing usable is left, with the first reasons.
    ``calibration``: the current estimator's overheads for every row instead of each group's file. ``pool``:
    fit the rows of every GPU group as one group, cross-validated by model across them (a check that the
    overheads carry over between GPUs of one torch x DeepSpeed version; nothing to write as a calibration)."""
    loaded = load_runs(paths, version=version)
    if not loaded.files:
        raise ValueError(f"no .jsonl files under {', '.join(map(str, paths))}: run zeroest validate first")
    records, unjoined = join_rows(list(loaded.rows), calibration)
    skipped = (*loaded.skipped, *unjoined)
    if not records:
        first = "; ".join(f"{s.where}: {s.reason}" for s in skipped[:2]) or "the files hold no rows"
        where = ", ".join(map(str, paths))
        raise ValueError(f"no usable runs in {where} ({len(skipped)} rows skipped: {first})")
    predictions: dict[str, dict[str, Prediction]] = {
        "stored": {r.key: r.stored for r in records if r.stored is not None},
        "current": {r.key: r.current for r in records},
    }
    fits: list[GroupFit] = []
    if fit:
        pooled = POOLED_PREFIX + ", ".join(sorted({r.env.group for r in records}))

        def group_of(r: Record) -> str:
            return pooled if pool else r.env.group

        groups: dict[str, list[Record]] = {}
        for r in records:
            groups.setdefault(group_of(r), []).append(r)
        for name, members in sorted(groups.items()):
            fits.append(_fit_group(name, members, k))
        by_group = {g.group: g for g in fits}
        predictions["defaults"] = _predict_all(records, lambda r: Overheads())
        predictions["in_sample"] = _predict_all(records, lambda r: by_group[group_of(r)].result.overheads)

        def held(r: Record) -> Overheads | None:
            cv = by_group[group_of(r)].cv
            return cv.held_out.get(r.key) if cv else None

        predictions["held_out"] = _predict_all(records, held)
    return Analysis(files=loaded.files, records=tuple(records), skipped=tuple(skipped),
                    predictions=predictions, fits=tuple(fits))


def _offload(r: Record) -> str:
    z = r.setup.zero
    parts = [f"optimizer:{z.offload_optimizer}"] if z.offload_optimizer != "none" else []
    parts += [f"params:{z.offload_params}"] if z.offload_params != "none" else []
    return "+".join(parts) or "none"


def _training(adapters) -> str:
    """full (every parameter trains), lora (peft adapters; qlora with a 4-bit base) or freeze (frozen base
    weights, no adapters)."""
    if adapters.lora:
        return "lora" if adapters.base_quant == "none" else "qlora"
    return "full" if adapters.full else "freeze"


DIMENSIONS: dict[str, Callable[[Record], object]] = {
    "stage": lambda r: int(r.setup.stage),
    "N_d": lambda r: r.setup.world_size,
    "family": lambda r: r.setup.model.family,
    "model": lambda r: r.model,
    "offload": _offload,
    "checkpointing": lambda r: "on" if r.setup.workload.grad_ckpt else "off",
    "dtype": lambda r: r.setup.dtype,
    "run": lambda r: "simulated" if r.simulated else "real",
    "loop": lambda r: r.setup.workload.loop,  # rows without the key: the worker's old loop (flat.setup_from_row)
    "training": lambda r: _training(r.setup.adapters),
    "allocator": lambda r: "expandable segments" if r.setup.expandable_segments else "default",
    "gpu": lambda r: r.env.group,
}
"""Breakdowns of the errors: each maps a record to its value in that dimension."""


def breakdown(analysis: Analysis, basis: str) -> dict[str, dict[str, dict[str, ErrorStats]]]:
    """dimension -> value -> quantity -> stats, under ``basis``."""
    out: dict[str, dict[str, dict[str, ErrorStats]]] = {}
    for dim, key in DIMENSIONS.items():
        per_q = {q: grouped_stats(analysis.compared, key, lambda r, q=q: analysis.error(r, basis, q))
                 for q in QUANTITIES}
        values = list(dict.fromkeys(v for q in QUANTITIES for v in per_q[q]))
        out[dim] = {v: {q: per_q[q].get(v, error_stats([])) for q in QUANTITIES} for v in values}
    return out


def phase_stats(analysis: Analysis, basis: str) -> dict[str, ErrorStats]:
    """Peak allocated error per measured phase (init, forward, backward, step)."""
    return {p: analysis.stats(basis, f"phase:{p}") for p in PHASES}


def drift(analysis: Analysis) -> ErrorStats:
    """(current - stored) / stored predicted peak allocated: how far the estimator moved since the runs."""
    values = []
    for r in analysis.records:
        if r.stored is not None and r.stored.quantities["peak_allocated"]:
            stored = r.stored.quantities["peak_allocated"]
            values.append((r.current.quantities["peak_allocated"] - stored) / stored)
    return error_stats(values)


@dataclass(frozen=True, kw_only=True)
class OomCase:
    """A run that ran out of memory, and whether the estimate saw it coming."""

    record: Record
    predicted_device_bytes: int
    gpu_memory_bytes: int | None

    @property
    def predicted_oom(self) -> bool | None:
        """True when the predicted device memory exceeds the GPU; None when the GPU size is unknown."""
        if not self.gpu_memory_bytes:
            return None
        return self.predicted_device_bytes > self.gpu_memory_bytes


def oom_cases(analysis: Analysis) -> tuple[list[OomCase], list[OomCase]]:
    """(runs that hit OOM, runs that finished although the estimate said they would not fit)."""
    def case(r: Record) -> OomCase:
        gpu = r.row.data.get("gpu") if isinstance(r.row.data.get("gpu"), dict) else {}
        return OomCase(record=r, predicted_device_bytes=r.current.quantities["device"],
                       gpu_memory_bytes=gpu.get("memory_bytes"))

    ooms = [case(r) for r in analysis.ooms]
    alarms = [c for c in map(case, analysis.compared) if c.predicted_oom]
    return ooms, alarms

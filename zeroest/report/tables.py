"""The report's tables beyond errors: measured claims, the comparison across runs, and the JSON summary."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from zeroest.estimator.configs.flat import setup_to_dict
from zeroest.estimator.core.shape import ModelShape
from zeroest.report import runs
from zeroest.report.analysis import Analysis, drift, oom_cases, phase_stats
from zeroest.report.fit import QUANTITIES
from zeroest.report.join import Record, overheads_for, predict
from zeroest.report.load import reduction_points, shape_key, worst_ranks


def run_label(r: Record) -> str:
    """The run's label (``report.runs.run_label``) from the setup it is estimated as."""
    return runs.run_label({**setup_to_dict(r.setup), "model": r.model}, r.simulated)


@dataclass(frozen=True, kw_only=True)
class ClaimPoint:
    """One stage's reduction of per-GPU memory over stage 0 at one N_d, measured beside three predictions."""

    model: str
    world_size: int
    stage: int
    measured: float
    """Measured peak allocated of stage 0 / of this stage (whole peak: activations included)."""
    predicted: float
    """The same ratio of the current estimator's peak allocated for both setups."""
    paper: float
    """The ZeRO paper's model-state reduction, (2 + 2 + K) Psi terms."""
    deepspeed: float
    """DeepSpeed-faithful model-state reduction (``estimator.claims``)."""
    simulated: bool


@cache
def _claims_row(shape: ModelShape, world: int, stage: int) -> tuple[float, float]:
    from zeroest.estimator.core.claims import claims_table

    row = next(r for r in claims_table(shape, (world,)) if r.stage == stage)
    return row.paper_reduction, row.deepspeed_reduction


def claim_points(analysis: Analysis) -> list[ClaimPoint]:
    """Measured reductions (``load.reduction_points``) with the estimator's and the paper's beside them."""
    by_where = {r.key: r for r in analysis.records}
    index: dict[tuple, Record] = {}
    for row in worst_ranks(r.row for r in analysis.compared):
        r = by_where[row.where]
        key = (shape_key(row.data["setup"]), r.setup.world_size, int(r.setup.stage))
        if key not in index or (index[key].simulated and not r.simulated):
            index[key] = r
    out = []
    for p in reduction_points([r.row for r in analysis.compared]):
        if p.stage == 0:
            continue
        r = index.get((p.shape, p.world_size, p.stage))
        base = index.get((p.shape, p.world_size, 0))
        if r is None or base is None:
            continue
        oh = overheads_for(r.env, r.simulated)
        predicted = (predict(base.setup, oh, simulated=base.simulated, cpu=base.cpu).quantities["peak_allocated"]
                     / predict(r.setup, oh, simulated=r.simulated, cpu=r.cpu).quantities["peak_allocated"])
        paper, deepspeed = _claims_row(r.setup.model, p.world_size, p.stage)
        out.append(ClaimPoint(model=r.model, world_size=p.world_size, stage=p.stage, measured=p.reduction,
                              predicted=predicted, paper=paper, deepspeed=deepspeed, simulated=p.simulated))
    return out


@dataclass(frozen=True, kw_only=True)
class RunLine:
    """One run in the comparison table (its worst rank)."""

    record: Record
    label: str
    status: str
    predicted_bytes: int
    allocated_bytes: int | None
    reserved_bytes: int | None
    device_bytes: int | None
    step_time_s: float | None
    tokens_per_s: float | None
    speedup: float | None
    """tokens/s over the stage-0 run of the same model, shape, N_d and kind (real or simulated)."""


def comparison(analysis: Analysis) -> dict[str, list[RunLine]]:
    """model -> its runs, ordered by N_d, simulated last, then stage."""
    by_where = {r.key: r for r in analysis.records}
    runs = [by_where[row.where] for row in worst_ranks(r.row for r in analysis.records)]
    base: dict[tuple, float] = {}
    for r in runs:
        tps = r.row.data["measured"].get("tokens_per_s")
        if int(r.setup.stage) == 0 and tps and r.oom is None:
            base.setdefault((shape_key(r.row.data["setup"]), r.setup.world_size, r.simulated), tps)
    out: dict[str, list[RunLine]] = {}
    for r in sorted(runs, key=lambda r: (r.model, r.setup.world_size, r.simulated, int(r.setup.stage))):
        m = r.row.data["measured"]
        tps = m.get("tokens_per_s") if r.oom is None else None
        ref = base.get((shape_key(r.row.data["setup"]), r.setup.world_size, r.simulated))
        out.setdefault(r.model, []).append(RunLine(
            record=r, label=run_label(r),
            status=f"oom@{r.oom}" if r.oom else str(r.row.data.get("status", "ok")),
            predicted_bytes=r.current.quantities["peak_allocated"],
            allocated_bytes=r.measured["peak_allocated"],
            reserved_bytes=r.measured["peak_reserved"], device_bytes=r.measured["device"],
            step_time_s=m.get("step_time_s") if r.oom is None else None, tokens_per_s=tps,
            speedup=tps / ref if tps and ref else None,
        ))
    return out


def summary(analysis: Analysis) -> dict:
    """``report --json``: a stable schema; the headline stats use ``analysis.primary`` (held out after
    --fit)."""
    import zeroest

    basis = analysis.primary
    ooms, alarms = oom_cases(analysis)
    out: dict = {
        "zeroest_version": zeroest.__version__,
        "runs": analysis.runs,
        "rows": len(analysis.records),
        "compared_rows": len(analysis.compared),
        "basis": basis,
        **{q: analysis.stats(basis, q).to_dict() for q in QUANTITIES},
        "phases": {p: s.to_dict() for p, s in phase_stats(analysis, basis).items()},
        "bases": {b: {q: analysis.stats(b, q).to_dict() for q in QUANTITIES} for b in analysis.bases},
        "drift": drift(analysis).to_dict(),
        "oom": {"runs": len(ooms), "predicted": sum(c.predicted_oom is True for c in ooms),
                "missed": sum(c.predicted_oom is False for c in ooms),
                "false_alarms": len(alarms)},
        "fits": {
            g.group: {
                "overheads": {k: v for k, v in g.result.overheads.to_dict().items() if k != "source"},
                "fitted": list(g.result.fitted), "held": list(g.result.held), "notes": list(g.result.notes),
                "models": list(g.models), "rows": g.rows, "cross_validated": g.cv is not None,
                "cv_note": g.cv_note, "path": str(g.path) if g.path else None,
            } for g in analysis.fits
        },
        "claims": [{"model": c.model, "world_size": c.world_size, "stage": c.stage, "measured": c.measured,
                    "predicted": c.predicted, "paper": c.paper, "deepspeed": c.deepspeed,
                    "simulated": c.simulated} for c in claim_points(analysis)],
        "skipped": [{"where": s.where, "reason": s.reason} for s in analysis.skipped],
    }
    return out

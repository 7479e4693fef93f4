"""``zeroest report --markdown FILE``: the accuracy report as Markdown (docs/ACCURACY.md is made this way)."""

from __future__ import annotations

import os
from pathlib import Path

from zeroest.estimator.core.overheads import Overheads
from zeroest.estimator.units import GiB, MiB
from zeroest.report.analysis import BASIS_TITLES, Analysis, GroupFit, breakdown, drift, oom_cases, phase_stats
from zeroest.report.errors import ErrorStats
from zeroest.report.fit import FITTED_FOR, QUANTITIES
from zeroest.report.tables import claim_points, comparison, run_label

TITLES = {"peak_allocated": "peak allocated", "peak_reserved": "peak reserved",
          "device": "device (nvidia-smi)"}
TARGETS: dict[str, tuple[float | None, float | None]] = {
    "peak_allocated": (0.02, 0.05), "peak_reserved": (0.05, None), "device": (0.05, None),
}
"""(median |error|, max |error|) the estimate aims at on real runs; None: no target."""


def pct(value: float | None, signed: bool = False) -> str:
    """A fraction as percent text: ``0.0213 -> 2.13%``; ``-`` for None."""
    if value is None:
        return "-"
    return f"{100 * value:+.2f}%" if signed else f"{100 * value:.2f}%"


def gib(n: int | float | None) -> str:
    """Bytes as GiB (2**30) with two decimals; ``-`` for None."""
    return "-" if n is None else f"{n / GiB:.2f}"


def _shown(path: Path) -> str:
    """A path relative to the working directory when it lies below it (docs stay free of machine paths)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _stat_cells(s: ErrorStats) -> list[str]:
    return [str(s.n), pct(s.median_abs_error), pct(s.max_abs_error), pct(s.mean_error, signed=True),
            pct(s.under_prediction_rate)]


def _verdict(quantity: str, s: ErrorStats) -> str:
    med, top = TARGETS[quantity]
    if not s.n:
        return "no data"
    ok = (med is None or s.median_abs_error <= med) and (top is None or s.max_abs_error <= top)
    goal = " and ".join(t for t in (f"median <= {pct(med)}" if med is not None else "",
                                    f"max <= {pct(top)}" if top is not None else "") if t)
    return f"{'meets' if ok else 'misses'} {goal}"


def _headline(a: Analysis) -> list[str]:
    basis = a.primary
    rows = [[TITLES[q], *_stat_cells(a.stats(basis, q)), _verdict(q, a.stats(basis, q))] for q in QUANTITIES]
    out = [f"## Headline ({BASIS_TITLES[basis]})", ""]
    out += _table(["quantity", "n", "median abs error", "max abs error", "mean (bias)", "under-predicted",
                   "target"], rows)
    out += ["", "Error = (predicted - measured) / measured, per measured rank. Under-predicted: the share of "
            "ranks given less memory than they used (an out-of-memory error the user would not see coming)."]
    if basis == "current" and any(r.current.overheads_source not in ("defaults", "None") for r in a.records):
        out += ["", "Some predictions use a calibration file; if it was fitted on these runs, these errors "
                "are in sample. Run with `--fit` for held-out errors."]
    return out


def _by_basis(a: Analysis) -> list[str]:
    out = ["## Errors under each set of overheads", ""]
    rows = [[BASIS_TITLES[b], TITLES[q], *_stat_cells(a.stats(b, q))] for q in QUANTITIES for b in a.bases]
    out += _table(["basis", "quantity", "n", "median abs", "max abs", "mean", "under-predicted"], rows)
    sources: dict[str, int] = {}
    for r in a.records:
        sources[r.current.overheads_source] = sources.get(r.current.overheads_source, 0) + 1
    files = {s: n for s, n in sources.items() if s != "defaults"}
    if files:
        used = ", ".join(f"`{s}` ({n} rows)" for s, n in sorted(files.items()))
        out += ["", f"The current estimator used calibration files: {used}; where a file was fitted on these "
                "runs, its errors are in sample, not a test of the estimate."]
    return out


def _phases(a: Analysis) -> list[str]:
    stats = phase_stats(a, a.primary)
    rows = [[p, *_stat_cells(s)] for p, s in stats.items() if s.n]
    if not rows:
        return []
    out = ["## Peak allocated per phase", "", "Measured phase peaks: `init`, and the largest over all steps "
           "of each forward, backward and optimizer step.", ""]
    return out + _table(["phase", "n", "median abs", "max abs", "mean", "under-predicted"], rows)


def _breakdowns(a: Analysis) -> list[str]:
    out = [f"## Breakdowns ({BASIS_TITLES[a.primary]})", ""]
    for dim, values in breakdown(a, a.primary).items():
        if len(values) < 2 and dim not in ("stage", "model"):
            continue
        rows = []
        for value, per_q in values.items():
            cells = [value]
            for q in QUANTITIES:
                s = per_q[q]
                cells += [str(s.n), pct(s.median_abs_error), pct(s.max_abs_error),
                          pct(s.under_prediction_rate)]
            rows.append(cells)
        heads = [dim] + [f"{short} {h}" for short in ("alloc", "reserved", "device")
                         for h in ("n", "median", "max", "under")]
        out += [f"### By {dim}", "", *_table(heads, rows), ""]
    return out


def _worst(a: Analysis, limit: int = 12) -> list[str]:
    errors = [(r, a.error(r, a.primary, "peak_allocated")) for r in a.compared]
    scored = [(abs(e), r, e) for r, e in errors if e is not None]
    scored.sort(key=lambda t: -t[0])
    rows = []
    for _, r, e in scored[:limit]:
        p = a.predictions[a.primary][r.key]
        rows.append([run_label(r), str(r.row.data.get("rank", 0)), gib(r.measured["peak_allocated"]),
                     gib(p.quantities["peak_allocated"]), pct(e, signed=True), p.peak_phase,
                     str(r.measured_peak_phase or "-")])
    out = ["## Largest peak-allocated errors", ""]
    return out + _table(["run", "rank", "measured GiB", "predicted GiB", "error", "predicted peak phase",
                         "measured peak phase"], rows)


def _drift_and_oom(a: Analysis) -> list[str]:
    d = drift(a)
    out = ["## Drift since the runs", ""]
    if d.n:
        out.append(f"{d.n} rows carry the prediction made at run time. The current estimator's peak "
                   f"allocated differs from it by {pct(d.median_abs_error)} in the median and "
                   f"{pct(d.max_abs_error)} at most "
                   f"(mean {pct(d.mean_error, signed=True)}).")
    else:
        out.append("No row carries a prediction made at run time.")
    ooms, alarms = oom_cases(a)
    out += ["", "## Out-of-memory runs", ""]
    if not ooms:
        out.append("No run ran out of memory.")
    else:
        said = {True: "yes", False: "**no (missed)**", None: "unknown GPU size"}
        rows = [[run_label(c.record), str(c.record.oom), gib(c.predicted_device_bytes),
                 gib(c.gpu_memory_bytes), said[c.predicted_oom]] for c in ooms]
        out += _table(["run", "phase", "predicted device GiB", "GPU GiB", "predicted 'does not fit'"], rows)
    out += ["", f"Runs that finished although the estimate said they would not fit: {len(alarms)}."]
    return out


def _overheads_table(fit: GroupFit) -> list[str]:
    default = Overheads()
    rows = []
    for quantity, names in FITTED_FOR.items():
        for name in names:
            before, after = getattr(default, name), getattr(fit.result.overheads, name)
            show = (lambda v: f"{v / MiB:.1f} MiB") if "_bytes" in name else (lambda v: f"{v:.4f}")
            status = "fitted" if name in fit.result.fitted else "held"
            rows.append([name, TITLES[quantity], show(before), show(after), status])
    return _table(["parameter", "shapes", "default", "fitted", ""], rows)


def _fits(a: Analysis) -> list[str]:
    if not a.fits:
        return []
    out = ["## Fitted overheads", "", "Only the named parameters of `Overheads` are fitted, each on the "
           "quantity it shapes, by least squares on relative errors; held-out errors come from k-fold "
           "cross-validation grouped by model (no model is in a training and a test fold at once).", ""]
    for g in a.fits:
        rows = g.rows
        out += [f"### {g.group}", "", f"{rows} rows, models: {', '.join(g.models)}.", "",
                *_overheads_table(g), ""]
        recs = [r for r in a.compared if r.env.group == g.group]
        table = [[BASIS_TITLES[b], TITLES[q], *_stat_cells(a.stats(b, q, recs))]
                 for q in QUANTITIES for b in ("defaults", "in_sample", "held_out") if a.predictions.get(b)]
        out += _table(["basis", "quantity", "n", "median abs", "max abs", "mean", "under-predicted"], table)
        notes = [*g.result.notes, *([g.cv_note] if g.cv_note else [])]
        if g.cv is not None:
            notes.append("folds (held-out models): " + "; ".join(", ".join(m) for m, _ in g.cv.folds))
        if g.path:
            notes.append(f"written to `{_shown(g.path)}`")
        else:
            why = ("CPU runs" if not g.env.gpu_name else "nothing could be fitted" if not g.result.fitted
                   else "not asked for: `--write-calibration PATH` writes it")
            notes.append(f"no calibration file written ({why})")
        out += ["", *(f"- {n}" for n in notes), ""]
    return out


def _verdicts(a: Analysis) -> list[str]:
    from zeroest.report.verdicts import VERDICT_HEADERS, verdict_rows, verdict_table, verdicts

    cards = verdicts(r for r in a.records if r.row.data["setup"].get("gpu_memory_bytes"))
    if not cards:
        return []
    return ["## Fit verdicts on emulated cards", "", *verdict_table(cards), "",
            *_table(VERDICT_HEADERS, verdict_rows(cards)), ""]


def _host(a: Analysis) -> list[str]:
    from zeroest.report.host import host_rows, host_section

    lines = host_section(host_rows(a.records), pct)
    return [*lines, ""] if lines else []


def _claims(a: Analysis) -> list[str]:
    points = claim_points(a)
    if not points:
        return ["## Measured claims", "", "No model was measured at stage 0 and another stage at one N_d."]
    rows = [[p.model, str(p.world_size), str(p.stage),
             f"{p.measured:.2f}x" + (" (sim)" if p.simulated else ""),
             f"{p.predicted:.2f}x", f"{p.deepspeed:.2f}x", f"{p.paper:.2f}x"] for p in points]
    out = ["## Measured claims", "", "Reduction of per-GPU memory over stage 0 at the same N_d and shape. "
           "Measured and predicted: whole peak allocated (activations included); DeepSpeed-faithful and "
           "paper: model states only (`zeroest claims`).", ""]
    return out + _table(["model", "N_d", "stage", "measured", "predicted", "DeepSpeed-faithful states",
                         "paper states"], rows)


def _comparison(a: Analysis) -> list[str]:
    out = ["## All runs", "", "Worst rank of each run. Speedup: tokens/s over the stage-0 run of the same "
           "model, shape, N_d and kind (simulated runs skip all communication, so their times are not "
           "speeds).", ""]
    for model, lines in comparison(a).items():
        rows = [[ln.label, ln.status, gib(ln.predicted_bytes), gib(ln.allocated_bytes),
                 gib(ln.reserved_bytes), gib(ln.device_bytes),
                 "-" if ln.step_time_s is None else f"{ln.step_time_s:.3f}",
                 "-" if ln.tokens_per_s is None else f"{ln.tokens_per_s:,.0f}",
                 "-" if ln.speedup is None else f"{ln.speedup:.2f}x"] for ln in lines]
        heads = ["run", "status", "predicted GiB", "allocated GiB", "reserved GiB", "device GiB", "step s",
                 "tokens/s", "speedup vs z0"]
        out += [f"### {model}", "", *_table(heads, rows), ""]
    return out


def _plots(plots: list[Path], markdown_path: Path) -> list[str]:
    pngs = [p for p in plots if p.suffix == ".png"]
    if not pngs:
        return []
    out = ["## Plots", ""]
    for p in pngs:
        rel = Path(os.path.relpath(p, markdown_path.parent)).as_posix()
        out += [f"![{p.stem}]({rel})", ""]
    return out


def _skipped(a: Analysis) -> list[str]:
    out = ["## Skipped rows", ""]
    if not a.skipped:
        return out + ["None."]
    return out + _table(["row", "reason"], [[s.where, s.reason.replace("|", "/")] for s in a.skipped])


def render(a: Analysis, *, command: str, markdown_path: Path, plots: list[Path] | None = None) -> str:
    """The whole report. Sizes in GiB (2**30 bytes), MiB (2**20)."""
    groups = sorted({r.env.group for r in a.records})
    head = ["# zeroest: prediction accuracy", "", f"Generated by `{command}`. Do not edit by hand.", "",
            f"{len(a.files)} runs files, {a.runs} runs, {len(a.records)} measured ranks ({len(a.compared)} "
            f"compared, {len(a.ooms)} out of memory), {len(a.skipped)} rows skipped. "
            f"Groups: {', '.join(groups)}.",
            ""]
    parts = [head, _headline(a), [""], _by_basis(a), [""], _phases(a), [""], _fits(a), _breakdowns(a),
             _worst(a), [""], _drift_and_oom(a), [""], _verdicts(a), _host(a), _claims(a), [""], _comparison(a),
             _plots(plots or [], markdown_path), _skipped(a)]
    return "\n".join(line for part in parts for line in part).rstrip() + "\n"

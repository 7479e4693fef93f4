"""``zeroest report RUNS...``: how far predictions are from measured runs, fitted overheads, plots and
Markdown.

Registered by zeroest/cli.py as ``app.command("report")(cmd_report.report)``. Parses, calls
``report_analysis.analyze``, writes what was asked for, renders; bad input is one line on stderr and exit code
2.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from zeroest.report.fit import QUANTITIES

log = logging.getLogger(__name__)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)


def _fail(message: str) -> None:
    err.print(f"zeroest: error: {message}", markup=False, soft_wrap=True)
    raise typer.Exit(2)


def default_calibration_dir() -> Path:
    """data/calibration of this checkout (where ``--fit`` writes unless told otherwise)."""
    return Path(__file__).resolve().parents[2] / "data" / "calibration"


def calibration_document(a, group) -> dict:
    """The JSON of one group's calibration file: {"overheads", "fitted_on", "errors"}."""
    import zeroest

    env = group.env
    recs = [r for r in a.compared if r.env.group == group.group]
    errors = {b: {q: a.stats(b, q, recs).to_dict() for q in QUANTITIES}
              for b in ("defaults", "in_sample", "held_out") if a.predictions.get(b)}
    errors["held_out_note"] = group.cv_note
    return {
        "overheads": {k: v for k, v in group.result.overheads.to_dict().items() if k != "source"},
        "fitted_on": {
            "gpu": env.gpu_name, "torch": env.torch_version, "deepspeed": env.ds_version,
            "zeroest_version": zeroest.__version__, "rows": group.rows,
            "runs": len({r.row.run_key for r in recs}), "models": list(group.models),
            "fitted": list(group.result.fitted), "held": list(group.result.held),
            "notes": list(group.result.notes),
            "files": sorted({str(r.row.source) for r in recs}),
        },
        "errors": errors,
    }


def write_calibrations(a, directory: Path):
    """Write the calibration file of each GPU group that fitted something; returns the analysis with the paths
    recorded (CPU groups are never written: predict is for GPUs)."""
    from zeroest.estimator.catalog.calibration import calibration_name

    fits = []
    for g in a.fits:
        if g.env.gpu_name and g.result.fitted:
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / calibration_name(g.env.gpu_name, g.env.torch_version, g.env.ds_version)
            path.write_text(json.dumps(calibration_document(a, g), indent=1) + "\n", encoding="utf-8")
            g = replace(g, path=path)
        fits.append(g)
    return replace(a, fits=tuple(fits))


def _command_line(runs: list[Path], fit: bool, plots: Path | None, markdown: Path | None) -> str:
    parts = ["zeroest report", *map(str, runs)]
    parts += ["--fit"] if fit else []
    parts += [f"--plots {plots}"] if plots else []
    parts += [f"--markdown {markdown}"] if markdown else []
    return " ".join(parts)


def _print_text(a, written: list[Path]) -> None:
    from zeroest.report.analysis import BASIS_TITLES
    from zeroest.report.markdown import TITLES, pct

    basis = a.primary
    out.print(f"{a.runs} runs, {len(a.records)} ranks ({len(a.compared)} compared, {len(a.ooms)} OOM), "
              f"{len(a.skipped)} rows skipped; errors {BASIS_TITLES[basis]}:")
    for q in QUANTITIES:
        s = a.stats(basis, q)
        out.print(f"  {TITLES[q]:<20} n={s.n:<4} median |err| {pct(s.median_abs_error):>7}  max |err| "
                  f"{pct(s.max_abs_error):>7}  under-predicted {pct(s.under_prediction_rate):>7}")
    for s in a.skipped[:10]:
        out.print(f"  skipped {s.where}: {s.reason}", markup=False)
    if len(a.skipped) > 10:
        out.print(f"  ... and {len(a.skipped) - 10} more skipped rows (see --markdown or --json)")
    for g in a.fits:
        note = f" ({g.cv_note})" if g.cv_note else ""
        where = f" -> {g.path}" if g.path else ""
        fitted = ", ".join(g.result.fitted) or "nothing"
        out.print(f"  fitted {fitted} on {g.group}{where}{note}", markup=False)
    for path in written:
        out.print(f"  wrote {path}", markup=False)


def report(
    runs: Annotated[list[Path] | None, typer.Argument(
        help="runs.jsonl files or folders holding them (searched recursively). Default: data/runs/.",
        show_default=False)] = None,
    fit: Annotated[bool, typer.Option(
        "--fit", help="Fit the named overheads per GPU x torch x DeepSpeed group, cross-validated by model, "
        "and write data/calibration/<group>.json.")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the summary as JSON (held-out errors with --fit).")] = False,
    plots: Annotated[Path | None, typer.Option(
        "--plots", help="Write the plots (PNG and SVG) into this folder.")] = None,
    markdown: Annotated[Path | None, typer.Option(
        "--markdown", help="Write the report as Markdown to this file.")] = None,
    folds: Annotated[int, typer.Option(
        "--folds", help="Cross-validation folds (at most one per model).")] = 5,
    calibration_dir: Annotated[Path | None, typer.Option(
        "--calibration-dir", help="Where --fit writes calibration files. Default: data/calibration/.",
        show_default=False)] = None,
) -> None:
    """Compare predictions with measured runs: errors, OOMs, measured claims; --fit calibrates the
    overheads."""
    import zeroest
    from zeroest.report.analysis import analyze
    from zeroest.report.runs import default_runs_dir

    if folds < 2:
        _fail(f"--folds must be 2 or more, got {folds}")
    paths = runs or [default_runs_dir()]
    try:
        a = analyze(paths, fit=fit, k=folds, version=zeroest.__version__)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    except ImportError as exc:  # the estimator itself is broken: say so in one line, not a traceback
        _fail(f"cannot load the estimator ({exc}); reinstall zeroest")
    written: list[Path] = []
    try:
        if fit:
            a = write_calibrations(a, calibration_dir or default_calibration_dir())
            written += [g.path for g in a.fits if g.path]
        plot_files: list[Path] = []
        if plots:
            from zeroest.report.plots import write_plots

            plot_files = write_plots(a, plots)
            written += plot_files
        if markdown:
            from zeroest.report.markdown import render

            markdown.parent.mkdir(parents=True, exist_ok=True)
            text = render(a, command=_command_line(paths, fit, plots, markdown), markdown_path=markdown,
                          plots=plot_files)
            markdown.write_text(text, encoding="utf-8")
            written.append(markdown)
    except OSError as exc:
        _fail(f"cannot write the report: {exc}")
    if as_json:
        from zeroest.report.tables import summary

        print(json.dumps(summary(a), indent=1))
        return
    _print_text(a, written)

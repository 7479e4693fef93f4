"""``zeroest report RUNS...``: how far predictions are from measured runs, fitted overheads, plots and
Markdown.

Registered by zeroest/cli/__init__.py as ``app.command("report")(report.report)``. Parses, calls
``zeroest.report.analysis.analyze``, writes only what an option with a path asks for (``--write-calibration``,
``--plots``, ``--markdown``), renders; bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from zeroest.cli.common import fail, out

log = logging.getLogger(__name__)


def _command_line(runs: list[Path], fit: bool, calibration: Path | None, plots: Path | None,
                  markdown: Path | None, held: Path | None = None, pool: bool = False) -> str:
    parts = ["zeroest report", *map(str, runs)]
    parts += [f"--calibration {held}"] if held else []
    parts += ["--fit"] if fit else []
    parts += ["--pool"] if pool else []
    parts += [f"--write-calibration {calibration}"] if calibration else []
    parts += [f"--plots {plots}"] if plots else []
    parts += [f"--markdown {markdown}"] if markdown else []
    return " ".join(parts)


def _print_text(a, written: list[Path]) -> None:
    from zeroest.report.analysis import BASIS_TITLES
    from zeroest.report.fit import QUANTITIES
    from zeroest.report.markdown import TITLES, pct

    basis = a.primary
    out.print(f"{a.runs} runs, {len(a.records)} ranks ({len(a.compared)} compared, {len(a.ooms)} OOM), "
              f"{len(a.skipped)} rows skipped; errors {BASIS_TITLES[basis]}:", soft_wrap=True)
    for q in QUANTITIES:
        s = a.stats(basis, q)
        out.print(f"  {TITLES[q]:<20} n={s.n:<4} median |err| {pct(s.median_abs_error):>7}  max |err| "
                  f"{pct(s.max_abs_error):>7}  under-predicted {pct(s.under_prediction_rate):>7}",
                  soft_wrap=True)
    from zeroest.report.bounds import LARGE_RUN_BYTES, large_runs

    big = large_runs(a.compared)
    for q in ("peak_reserved", "device"):
        s = a.stats(basis, q, big)
        out.print(f"  {TITLES[q]:<20} n={s.n:<4} median |err| {pct(s.median_abs_error):>7}  max |err| "
                  f"{pct(s.max_abs_error):>7}  under-predicted {pct(s.under_prediction_rate):>7}  "
                  f"(runs of {LARGE_RUN_BYTES / 2**30:g} GiB reserved and more)", soft_wrap=True)
    from zeroest.report.host import host_rows, host_stats

    hosts = host_rows(a.records)
    for name, keep in (("host RSS", None), ("  with offload", True)):
        s = host_stats(hosts, keep)
        if s.n:
            out.print(f"  {name:<20} n={s.n:<4} median |err| {pct(s.median_abs_error):>7}  max |err| "
                      f"{pct(s.max_abs_error):>7}  under-predicted {pct(s.under_prediction_rate):>7}  "
                      "(current estimator, per rank, from init on)", soft_wrap=True)
    _print_by_family(a, basis)
    for s in a.skipped[:10]:
        out.print(f"  skipped {s.where}: {s.reason}", markup=False, soft_wrap=True)
    if len(a.skipped) > 10:
        out.print(f"  ... and {len(a.skipped) - 10} more skipped rows (see --markdown or --json)",
                  soft_wrap=True)
    for g in a.fits:
        note = f" ({g.cv_note})" if g.cv_note else ""
        where = f" -> {g.path}" if g.path else ""
        fitted = ", ".join(g.result.fitted) or "nothing"
        out.print(f"  fitted {fitted} on {g.group}{where}{note}", markup=False, soft_wrap=True)
        if g.bound is not None:
            b, by = g.bound.overheads, (g.bound.reserved_key or "the fit", g.bound.device_key or "the fit")
            out.print(f"  conservative bound on {g.group} (no row under-predicted): reserved_fraction_of_peak "
                      f"{b.reserved_fraction_of_peak:.3f} (set by {by[0]}), cuda_context_bytes "
                      f"{b.cuda_context_bytes / 2**20:.0f} MiB (set by {by[1]})", markup=False, soft_wrap=True)
    if len(a.fits) > 1:
        from zeroest.estimator.core.overheads import Overheads
        from zeroest.report.bounds import conservative_overheads

        bound = conservative_overheads([r.sample for r in a.records if not r.cpu], Overheads())
        b = bound.overheads
        out.print(f"  conservative bound over every GPU group (defaults otherwise): reserved_fraction_of_peak "
                  f"{b.reserved_fraction_of_peak:.3f} (set by {bound.reserved_key or 'the defaults'}), "
                  f"cuda_context_bytes {b.cuda_context_bytes / 2**20:.0f} MiB (set by "
                  f"{bound.device_key or 'the defaults'})", markup=False, soft_wrap=True)
    for path in written:
        out.print(f"  wrote {path}", markup=False, soft_wrap=True)


def _print_by_family(a, basis: str) -> None:
    """Peak allocated per model family (closed-form and traced families apart) and per way of training (full, LoRA,
    freeze), each when the runs hold several."""
    from zeroest.report.analysis import DIMENSIONS
    from zeroest.report.errors import grouped_stats
    from zeroest.report.markdown import pct

    for dimension in ("family", "training"):
        per = grouped_stats(a.compared, DIMENSIONS[dimension], lambda r: a.error(r, basis, "peak_allocated"))
        if len(per) < 2:
            continue
        parts = [f"{value} n={s.n} median {pct(s.median_abs_error)} max {pct(s.max_abs_error)}"
                 for value, s in per.items()]
        out.print(f"  peak allocated by {dimension}: {'; '.join(parts)}", markup=False, soft_wrap=True)


def _check_outputs(markdown: Path | None, plots: Path | None) -> None:
    """Refuse output paths of the wrong kind before the analysis runs, one line each."""
    if markdown is not None and markdown.is_dir():
        fail(f"--markdown {markdown} is a folder: give a file name in it, e.g. {markdown / 'report.md'}")
    if plots is not None and plots.exists() and not plots.is_dir():
        fail(f"--plots {plots} is a file: give a folder for the plots (made if missing)")


def report(
    runs: Annotated[list[Path] | None, typer.Argument(
        help="runs.jsonl files or folders holding them (searched recursively). Default: data/runs/.",
        show_default=False)] = None,
    fit: Annotated[bool, typer.Option(
        "--fit", help="Fit the named overheads per GPU x torch x DeepSpeed group, cross-validated by model "
        "(writes nothing; see --write-calibration).")] = False,
    write_calibration: Annotated[Path | None, typer.Option(
        "--write-calibration", help="With --fit, write the fitted calibration JSON: to this file (one GPU "
        "group), or <group>.json into this folder (predict reads data/calibration/).",
        show_default=False)] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the summary as JSON (held-out errors with --fit).")] = False,
    plots: Annotated[Path | None, typer.Option(
        "--plots", help="Write the plots (PNG and SVG) into this folder.")] = None,
    markdown: Annotated[Path | None, typer.Option(
        "--markdown", help="Write the report as Markdown to this file.")] = None,
    folds: Annotated[int, typer.Option(
        "--folds", help="Cross-validation folds (at most one per model).")] = 5,
    pool: Annotated[bool, typer.Option(
        "--pool", help="With --fit, fit every GPU group's rows as one group, cross-validated by model across "
        "them (do the overheads carry over between GPUs?); cannot be written as a calibration.")] = False,
    calibration: Annotated[Path | None, typer.Option(
        "--calibration", help="Predict every row with this calibration JSON instead of its group's file (hold "
        "a calibration against runs it was not fitted on).", show_default=False)] = None,
) -> None:
    """Compare predictions with measured runs: errors, OOMs, measured claims; --fit calibrates the
    overheads."""
    import zeroest
    from zeroest.report.analysis import analyze
    from zeroest.report.runs import default_runs_dir

    if folds < 2:
        fail(f"--folds must be 2 or more, got {folds}")
    if write_calibration and not fit:
        fail(f"--write-calibration {write_calibration} needs --fit: there is nothing fitted to write")
    if pool and not fit:
        fail("--pool needs --fit: it pools the rows of the fit")
    if pool and write_calibration:
        fail("--pool fits several GPUs at once, which is no one GPU's calibration: drop --write-calibration "
             "or --pool")
    _check_outputs(markdown, plots)
    paths = runs or [default_runs_dir()]
    try:
        held = None
        if calibration is not None:
            from zeroest.estimator.catalog.calibration import load_calibration

            held = load_calibration(calibration)
        a = analyze(paths, fit=fit, k=folds, version=zeroest.__version__, calibration=held, pool=pool)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    except ImportError as exc:  # the estimator itself is broken: say so in one line, not a traceback
        fail(f"cannot load the estimator ({exc}); reinstall zeroest")
    written: list[Path] = []
    try:
        if write_calibration:
            from zeroest.report.calibration import write_calibrations

            a = write_calibrations(a, write_calibration)
            written += [g.path for g in a.fits if g.path]
        plot_files: list[Path] = []
        if plots:
            from zeroest.report.plots import write_plots

            plot_files = write_plots(a, plots)
            written += plot_files
        if markdown:
            from zeroest.report.calibration import write_text
            from zeroest.report.markdown import render

            command = _command_line(paths, fit, write_calibration, plots, markdown, calibration, pool)
            write_text(markdown, render(a, command=command, markdown_path=markdown, plots=plot_files))
            written.append(markdown)
    except ValueError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write the report: {exc}")
    if as_json:
        from zeroest.report.tables import summary

        print(json.dumps(summary(a), indent=1))
        return
    _print_text(a, written)
    from zeroest.report.verdicts import verdict_table, verdicts

    cards = verdicts(r for r in a.records if r.row.data["setup"].get("gpu_memory_bytes"))
    for line in verdict_table(cards) if cards else []:
        out.print(line, markup=False, soft_wrap=True)

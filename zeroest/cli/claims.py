"""``zeroest claims``: the ZeRO paper's 4x / 8x / N_d reductions against DeepSpeed's real allocations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from zeroest.cli import options as o
from zeroest.cli.common import fail, out


def claims(
    params: o.ParamsOpt = None,
    model: o.ModelOpt = None,
    runs: Annotated[str | None, typer.Option("--runs", help="Folder or runs.jsonl of measured runs to add.")] = None,
    plot: Annotated[str | None, typer.Option("--plot", help="Write the reduction-vs-N_d plot here (PNG/SVG).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Check the ZeRO paper's 4x / 8x / N_d claims against what DeepSpeed really allocates."""
    from zeroest.cli.render_claims import print_claims, write_claims_plot
    from zeroest.estimator.core.claims import claims_table, verdicts

    if plot and (Path(plot).is_dir() or not Path(plot).suffix):
        fail(f"--plot {plot}: {'is a folder' if Path(plot).is_dir() else 'has no suffix'}; give a file name ending "
             ".png or .svg")
    try:
        shape = o.resolve_model(params, model) if (params or model) else o.resolve_model("7.5B", None)
        table = claims_table(shape)
        measured = None
        if runs:
            from zeroest.report.load import measured_reductions

            measured = measured_reductions(runs)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    if plot:
        try:
            write_claims_plot(table, plot, measured)
        except ImportError:
            fail("--plot needs matplotlib, which is not installed: pip install matplotlib (or 'zeroest[validate]')")
        except OSError as exc:
            fail(f"--plot {plot}: cannot write it ({exc.strerror}); pick a path in a folder that exists")
        except ValueError as exc:  # matplotlib's savefig on a suffix it has no writer for
            fail(f"--plot {plot}: {str(exc).rstrip('.')}; name it .png or .svg")
    if as_json:
        out.print_json(json.dumps({"model": shape.name, "rows": [r.to_dict() for r in table],
                                   "verdicts": verdicts(table), "measured": measured}))
        return
    print_claims(table, verdicts(table), measured, out)

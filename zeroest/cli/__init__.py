"""The ``zeroest`` command line: one module per command, each parsing its flags, calling one library entry point
and rendering. This module only registers them."""

from __future__ import annotations

import logging

import typer

from zeroest.cli import claims, coerce, models, plan, predict, report, validate

coerce.install()
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Per-GPU memory of DeepSpeed ZeRO training: predict it, check it, plan with it.")
app.command("predict")(predict.predict)
app.command("claims")(claims.claims)
app.command("models")(models.models)
app.command("validate")(validate.validate)
app.command("report")(report.report)
app.command("plan")(plan.plan)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="zeroest: %(message)s")
    app()

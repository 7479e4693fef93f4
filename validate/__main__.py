"""``python -m zeroest.validate``: the validate command alone (same flags as ``zeroest validate``)."""

from __future__ import annotations

import typer

from zeroest.cli.validate import validate

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command()(validate)

if __name__ == "__main__":
    app()

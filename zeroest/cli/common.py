"""What every command shares: the consoles and the one way to report bad input."""

from __future__ import annotations

import typer
from rich.console import Console

out = Console(highlight=False, emoji=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
"""No ``:name:`` emoji codes read in what we print (a path or a model name may hold one), which also spares rich
loading its emoji table at start-up."""


def warn(message: str) -> None:
    """One warning line on stderr."""
    err.print(f"zeroest: warning: {message}", markup=False)


def fail(message: str) -> None:
    """One clear line on stderr and exit code 2: the only way a command reports bad input."""
    err.print(f"zeroest: error: {message}", markup=False)
    raise typer.Exit(2)

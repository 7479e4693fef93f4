"""The ``zeroest`` command line: one module per command, each parsing its flags, calling one library entry point
and rendering. This module only registers them.

A command's module is imported, and its click command built, only when that command is run or help lists it:
``zeroest predict`` does not import ``plan``'s, ``report``'s or ``validate``'s modules, nor read their signatures,
which is a good part of its start-up (``benchmarks/bench_startup.py``).
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Iterator, Mapping

import typer
from typer.core import TyperGroup

from zeroest.cli import coerce

COMMANDS = ("predict", "claims", "models", "validate", "report", "plan")
"""Each command's name, which is also the name of its module in ``zeroest.cli`` and of its function there."""


class _Commands(Mapping):
    """The group's commands, name to click command, each built on first look-up."""

    def __init__(self) -> None:
        self._built: dict = {}

    def __getitem__(self, name: str):
        if name not in COMMANDS:
            raise KeyError(name)
        if name not in self._built:
            function = getattr(importlib.import_module(f"zeroest.cli.{name}"), name)
            self._built[name] = typer.main.get_command_from_info(
                typer.models.CommandInfo(name=name, callback=function), pretty_exceptions_short=True,
                rich_markup_mode=typer.core.DEFAULT_MARKUP_MODE)
        return self._built[name]

    def __iter__(self) -> Iterator[str]:
        return iter(COMMANDS)

    def __len__(self) -> int:
        return len(COMMANDS)


class _LazyGroup(TyperGroup):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.commands = _Commands()

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        """Run as click does, except that a usage error (a value not among the choices, a missing value, an
        unknown option or command) is one ``zeroest: error:`` line naming the command's --help, like every other
        bad input, instead of typer's boxed panel."""
        from typer._click.exceptions import ClickException, NoArgsIsHelpError

        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except NoArgsIsHelpError as exc:  # the help is printed already
            sys.exit(exc.exit_code)
        except ClickException as exc:
            from zeroest.cli.common import err

            ctx = getattr(exc, "ctx", None)
            where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            err.print(f"zeroest: error: {exc.format_message().rstrip('.')}{where}", markup=False)
            sys.exit(exc.exit_code)
        except typer.Abort:
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


coerce.install()
app = typer.Typer(cls=_LazyGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


@app.callback()
def _group() -> None:
    """Per-GPU memory of DeepSpeed ZeRO training: predict it, check it, plan with it."""


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="zeroest: %(message)s")
    app()

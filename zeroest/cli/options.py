"""The setup's flags, read off ``TrainingSetup``'s fields, collected into one dict per command.

Every field declared with ``core.setup.axis`` becomes an option of the commands decorated with
``setup_options``: the vocabulary's ``StrEnum``s are the option types, the field's default and help are shown,
and the values typed (only those) reach the command as one dict. ``zeroest.api.build_setup`` hands that dict to
``configs.flat.setup_from_dict``, the reader that grids and runs.jsonl rows go through too, so every entry point
applies the same defaults and rules.
"""

from __future__ import annotations

import functools
import inspect
import typing
from enum import Enum
from typing import Annotated

import typer

from zeroest.estimator.configs.flat import PARTS, axes
from zeroest.estimator.core.setup import MAX_PARAMS, TrainingSetup
from zeroest.estimator.core.shape import ModelShape
from zeroest.estimator.units import parse_count

GPU_HELP = (
    "GPU to check the fit against: a preset (4090, 3090, a6000, l40s, a100-40g, a100-80g, h100, h200, b200, "
    "mi300x, ...; see data/gpus.yaml) or a size with its unit: 24GB (10**9 bytes) or 24GiB (2**30 bytes); "
    "a bare number or a bare G is refused as ambiguous."
)
"""Help text of the ``--gpu`` option (predict and plan); ``catalog.gpus.parse_gpu`` reads the value, imported only
when one is given."""
ParamsOpt = Annotated[str | None, typer.Option("--params", help="Model size, e.g. 1.3B or 350M: a standard "
                                               "llama-style decoder of that size.")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="A preset (zeroest models lists them) or a path to an "
                                              "HF config.json or its folder.")]


def _hints() -> dict[str, dict[str, object]]:
    return {name: typing.get_type_hints(cls) for name, cls in (("", TrainingSetup), *PARTS.items())}


def _default_text(value) -> str:
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:.0e}".replace("e+0", "e") if isinstance(value, int) and value >= 10**6 else str(value)


def _option(key: str, part: str | None, f, hints) -> inspect.Parameter:
    """One keyword-only parameter for a setup field: its type from the vocabulary, default None (not typed)."""
    kind = hints[part or ""][f.name]
    base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
    help_text = f.metadata["help"]
    if f.default not in (None, "") and not isinstance(f.default, type(inspect.Parameter.empty)):
        help_text += f" Default: {_default_text(f.default)}."
    if f.metadata["count"]:
        base = str
    option = typer.Option(*f.metadata["flag"].split(" "), help=help_text, show_default=False)
    if base is bool:
        annotation = Annotated[bool | None, option]
    elif isinstance(base, type) and issubclass(base, Enum):
        annotation = Annotated[base | None, option]
    else:
        annotation = Annotated[base | None, option]
    return inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)


def setup_options(*, exclude: tuple[str, ...] = ()):
    """Decorator: add one option per setup field (except ``exclude``) to a typer command.

    The command takes a ``flags: dict`` parameter instead: the setup keys the user typed, with their values
    (element counts such as ``5e8`` parsed). Its own parameters keep their place before the setup's.
    """

    def wrap(command):
        hints = _hints()
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "flags"]
        owned = {p.name for p in own}
        extra = [_option(key, part, f, hints) for key, part, f in axes()
                 if key not in exclude and key not in owned]
        counts = {key for key, _, f in axes() if f.metadata["count"]}
        names = {p.name for p in extra}

        @functools.wraps(command)
        def run(**kwargs):
            flags = {}
            for name in names:
                value = kwargs.pop(name)
                if value is None:
                    continue
                if name in counts:
                    try:
                        value = parse_count(value, what="number of elements", minimum=0)
                    except ValueError as exc:
                        from zeroest.cli.common import fail

                        fail(f"--{name.replace('_', '-')}: {exc}")
                flags[name] = value.value if isinstance(value, Enum) else value
            return command(flags=flags, **kwargs)

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + extra
        run.__signature__ = inspect.Signature(params)
        run.__annotations__ = {}
        del run.__wrapped__
        return run

    return wrap


def resolve_model(params: str | None, model: str | None) -> ModelShape:
    """The ModelShape from exactly one of --params and --model."""
    if (params is None) == (model is None):
        raise ValueError("give exactly one of --params (e.g. --params 1.3B) and --model (a preset or config.json)")
    if params is not None:
        from zeroest.estimator.catalog.models import standard_shape

        try:
            count = parse_count(params)
        except ValueError as exc:
            raise ValueError(f"--params: {exc}") from None
        if count > MAX_PARAMS:
            raise ValueError(f"--params {params}: {count:.3g} parameters is beyond what zeroest shapes (at most "
                             f"{MAX_PARAMS:.0e}, a thousand times GPT-3's largest); give a smaller size, e.g. 70B")
        return standard_shape(count)
    from zeroest.estimator.catalog.models import load_model

    return load_model(model)

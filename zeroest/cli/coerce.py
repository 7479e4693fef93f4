"""Option values turned into their types without pydantic, so that ``zeroest predict`` starts fast.

typer (0.29) coerces every parameter through a pydantic ``TypeAdapter`` (``typer/_coercion.py``
``build_runtime_param``), and importing pydantic for it costs about a third of ``zeroest predict``'s start-up.
Our options are all plain: str, int, float, bool, a ``StrEnum``, a ``Path``, or a list of one of them. For those,
``install()`` puts a coercion that click's own messages would give (``'x' is not a valid integer``); anything else
goes to typer's. Help also drops the ``<bool>`` typer prints beside flags. If typer's internals are not where
this expects them, nothing is changed.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

_NAMES = {int: "integer", float: "float", str: "string", bool: "boolean"}
_TRUE, _FALSE = ("1", "true", "t", "yes", "y", "on"), ("0", "false", "f", "no", "n", "off")


def _simple(annotation) -> bool:
    return annotation in _NAMES or annotation is Path or (isinstance(annotation, type) and issubclass(annotation, Enum))


def _convert(annotation, value):
    if isinstance(value, annotation) and not (annotation is int and isinstance(value, bool)):
        return value
    text = str(value)
    if annotation is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"{text!r} is not a valid boolean")
    if issubclass(annotation, Enum):
        choices = [member.value for member in annotation]
        if text in choices:
            return annotation(text)
        raise ValueError(f"{text!r} is not one of {', '.join(map(str, choices))}")
    try:
        return annotation(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a valid {_NAMES.get(annotation, annotation.__name__)}") from None


def install() -> None:
    """Route plain annotations to ``_convert`` (a no-op if typer's coercion layer has moved)."""
    try:
        import typer.core as core
        from typer._coercion import BadParameter, RuntimeParam
    except ImportError:
        return
    original = getattr(core, "build_runtime_param", None)
    if original is None or getattr(original, "_zeroest", False):
        return

    @dataclass(frozen=True)
    class PlainRuntimeParam(RuntimeParam):
        def _coerce_value(self, value, param, ctx):
            kind = self.annotation
            item = typing.get_args(kind)[0] if typing.get_origin(kind) is list else None
            try:
                if item is not None:
                    values = value if isinstance(value, list | tuple) else [value]
                    return [_convert(item, v) for v in values]
                return _convert(kind, value)
            except ValueError as exc:
                raise BadParameter(str(exc), ctx=ctx, param=param) from None

    def build(descriptor):
        kind = descriptor.annotation
        item = typing.get_args(kind)[0] if typing.get_origin(kind) is list else kind
        if descriptor.file_annotation is None and _simple(item):
            return PlainRuntimeParam(annotation=kind, parameter_info=descriptor.parameter_info)
        return original(descriptor)

    build._zeroest = True
    core.build_runtime_param = build
    _hide_flag_type(core)


def _hide_flag_type(core) -> None:
    """Help shows no ``<bool>`` beside a plain flag (``--json``, ``--grad-ckpt/--no-grad-ckpt``): it takes no
    value."""
    option = getattr(core, "TyperOption", None)
    shown = getattr(option, "display_type_rich", None)
    if shown is None:
        return

    def display_type_rich(self, ctx):
        return "" if getattr(self, "is_flag", False) else shown(self, ctx)

    option.display_type_rich = display_type_rich

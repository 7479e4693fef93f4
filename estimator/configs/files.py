"""Reading config files with errors that name file, line and column, and unknown-key warnings that name the
nearest known key. Shared by ``config_read`` (ds_config.json) and ``config_accelerate`` (accelerate YAML)."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror}; check the path") from None


def read_json(path: str | Path) -> dict:
    """A JSON object from ``path``; ValueError naming file, line and column if it is not one."""
    path = Path(path)
    text = _read_text(path)
    def finite(number: str) -> float:  # 1e999, NaN and Infinity: Python's json takes them, no config means them
        if not math.isfinite(float(number)):
            raise ValueError(f"{path}: the number {number} is not a finite value; fix the file")
        return float(number)

    try:
        data = json.loads(text, parse_float=finite, parse_constant=finite)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}:{err.colno}: invalid JSON ({err.msg}); fix the file") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of DeepSpeed settings, got {type(data).__name__}")
    return data


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from ``path``; ValueError naming file, line and column if it is not one."""
    import yaml

    path = Path(path)
    text = _read_text(path)
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ValueError(f"{where}: invalid YAML ({err.problem or err.context}); fix the file") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping (an accelerate config), got {type(data).__name__}")
    return data


def unknown_key_warnings(data: dict, known: tuple[str, ...], where: str, consequence: str) -> list[str]:
    """One warning per key of ``data`` not in ``known``, with the nearest known key."""
    import difflib  # for suggestions only: kept off start-up
    out = []
    for key in data:
        if key in known:
            continue
        near = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        out.append(f"{where}: unknown key {key!r}{hint} ({consequence})")
    return out


def whole_number(value, what: str, where: str, minimum: int | None = None) -> int:
    """``value`` as an int; ValueError naming ``what`` and ``where`` if it is not a whole number (or below
    ``minimum``)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {what} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"{where}: {what} must be a whole number, got {value!r}")
    if minimum is not None and number < minimum:
        raise ValueError(f"{where}: {what} must be {minimum} or more, got {value!r}; fix the file")
    return int(number)


_TRUE = ("1", "on", "t", "true", "y", "yes")
_FALSE = ("0", "off", "f", "false", "n", "no")


def ds_bool(value, what: str, where: str, refusal: str = "DeepSpeed stops at init") -> bool:
    """A ds_config boolean read as DeepSpeed's pydantic config models read it (lax mode): true/false, 0/1, or one
    of the strings pydantic takes ("yes", "off", ...), any case. ValueError naming the key for anything else
    (DeepSpeed stops at init), rather than Python's truthiness, which reads "false" as true."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{where}: {what} must be true or false, got {value!r} ({refusal}); fix the file")

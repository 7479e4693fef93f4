"""zeroest's data files: where they are (the ``zeroest.data`` package, ``data/`` in a checkout) and the only functions
that read them.

Every reader of a preset, a GPU table or a calibration goes through ``load_json`` / ``load_yaml``, so bad content
always fails the same way: one ``ValueError`` that names the file (and line and column where the parser knows
them) and says to fix it.
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path


def data_path(*parts: str) -> Path:
    """A file or folder of ``zeroest.data``, e.g. ``data_path("models")``; the checkout's ``data/`` when the package
    cannot be imported (running from a source tree that was not installed)."""
    try:
        root = Path(str(importlib.resources.files("zeroest.data")))
    except ModuleNotFoundError:
        root = Path(__file__).resolve().parents[2] / "data"
    return root.joinpath(*parts)


def read_text(path: Path, what: str) -> str:
    """The text of ``path`` (UTF-8); ValueError naming the file when it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ValueError(f"cannot read {what} {path}: {reason}; check the path") from None


def _mapping(data: object, path: Path | str, what: str, kind: str) -> dict:
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a {kind} object ({what}), got {type(data).__name__}; fix the file")
    return data


def parse_json(text: str, where: Path | str, what: str) -> dict:
    """A JSON object from ``text`` read from ``where``; ValueError ``where:line:col: invalid JSON (...)``."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}:{err.lineno}:{err.colno}: invalid JSON ({err.msg}); fix the file") from None
    return _mapping(data, where, what, "JSON")


def load_json(path: Path, what: str) -> dict:
    """The JSON object in ``path``; ``what`` names it in errors (``"calibration"``, ``"model config"``)."""
    return parse_json(read_text(path, what), path, what)


def load_yaml(path: Path, what: str) -> dict:
    """The YAML mapping in ``path`` (``yaml.safe_load``); ValueError naming file, line and column on bad YAML."""
    import yaml

    text = read_text(path, what)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or getattr(err, "context", None) or str(err)
        raise ValueError(f"{where}: invalid YAML ({problem}); fix the file") from None
    return _mapping(data, path, what, "YAML")

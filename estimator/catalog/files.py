"""Where zeroest's data files are: the ``zeroest.data`` package (``data/`` in a checkout, installed with it)."""

from __future__ import annotations

import importlib.resources
from pathlib import Path


def data_path(*parts: str) -> Path:
    """A file or folder of ``zeroest.data``, e.g. ``data_path("models")``; the checkout's ``data/`` when the package
    cannot be imported (running from a source tree that was not installed)."""
    try:
        root = Path(str(importlib.resources.files("zeroest.data")))
    except ModuleNotFoundError:
        root = Path(__file__).resolve().parents[2] / "data"
    return root.joinpath(*parts)

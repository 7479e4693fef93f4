"""GPU presets (data/gpus.yaml) and ``--gpu`` parsing: a preset name or a size such as ``24GiB``."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from zeroest.estimator.catalog.files import data_path
from zeroest.estimator.units import MiB, parse_bytes


@dataclass(frozen=True, kw_only=True)
class Gpu:
    """A GPU's name and the memory a process can at most hold on it (nvidia-smi's total)."""

    name: str
    memory_bytes: int


def gpu_presets() -> dict[str, Gpu]:
    import yaml

    raw = yaml.safe_load(data_path("gpus.yaml").read_text())
    return {str(key): Gpu(name=val["name"], memory_bytes=int(val["memory_mib"]) * MiB) for key, val in raw.items()}


def parse_gpu(text: str) -> Gpu:
    """``h100`` (a preset) or ``24GiB``/``80GB`` (a size)."""
    presets = gpu_presets()
    key = text.strip().lower()
    if key in presets:
        return presets[key]
    try:
        return Gpu(name=text, memory_bytes=parse_bytes(text))
    except ValueError:
        near = difflib.get_close_matches(key, presets, n=3)
        hint = f"did you mean {', '.join(near)}? " if near else ""
        raise ValueError(
            f"unknown GPU {text!r}: {hint}use a preset ({', '.join(presets)}) or a size such as 24GiB or 80GB"
        ) from None

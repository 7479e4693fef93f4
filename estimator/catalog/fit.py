"""The one fit verdict: does a predicted device footprint fit a GPU, keeping a margin free?

A setup fits when ``device_bytes <= usable_bytes(gpu, margin) = floor((1 - margin) * memory_bytes)``, where
``device_bytes`` is ``Estimate.device_bytes`` (what nvidia-smi shows for the process: reserved + CUDA context +
NCCL) and ``memory_bytes`` the driver's total (``Gpu.memory_bytes``). ``predict`` reports it; ``plan``'s searches
use the same ``usable_bytes`` (``plan.search.budget_bytes``) as their budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from zeroest.estimator.units import format_gib

if TYPE_CHECKING:  # annotations only: the --gpu parser is not imported for a prediction without --gpu
    from zeroest.estimator.catalog.gpus import Gpu

FIT_MARGIN = 0.1
"""Default fraction of the GPU's memory kept free (``--margin``). 10% covers what the estimate does not model:
the caching allocator's fragmentation beyond the fitted reserved fractions (a job that needs a new 2 MiB-rounded
segment when cached blocks cannot be split to fit: c10/cuda/CUDACachingAllocator.cpp), other processes on the
card (a display server, a monitoring agent, a second rank's context), and growth the model leaves out (NCCL
buffers per peer, 0 until multi-GPU runs fit them; lazily created cuDNN/cuBLAS workspaces). The fitted device
figure's largest error on the reference runs is 27% (data/calibration/*.json, ``errors.defaults.device``), its
median 3.4%: 10% is above the median error with room to spare, not a bound on the worst case."""


def check_margin(margin: float) -> float:
    """``margin`` if it is a fraction in [0, 1), else ValueError (one line, naming ``--margin``)."""
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise ValueError(
            f"--margin {margin!r} is not a fraction in [0, 1): it is the share of the GPU's memory kept free, "
            f"e.g. {FIT_MARGIN} for {FIT_MARGIN:.0%}"
        )
    return float(margin)


def margin_text(margin: float) -> str:
    """The margin as ``--margin``'s help and every verdict write it: ``10%`` for 0.1, ``12.5%`` for 0.125."""
    return f"{100 * margin:g}%"


def usable_bytes(memory_bytes: int, margin: float = FIT_MARGIN) -> int:
    """Device bytes a setup may use on a GPU of ``memory_bytes``: ``floor((1 - margin) * memory_bytes)``."""
    return math.floor(memory_bytes * (1 - check_margin(margin)))


@dataclass(frozen=True, kw_only=True)
class Fit:
    """The verdict of ``fit_verdict``: the figures it compared and the room left (bytes)."""

    gpu: Gpu
    device_bytes: int
    """Predicted device memory of one rank (``Estimate.device_bytes``), rounded up to a whole byte."""
    margin: float
    """Fraction of ``gpu.memory_bytes`` kept free."""
    usable_bytes: int
    """``floor((1 - margin) * gpu.memory_bytes)``."""
    headroom_bytes: int
    """``usable_bytes - device_bytes``: spare when >= 0, short when < 0."""

    @property
    def fits(self) -> bool:
        return self.headroom_bytes >= 0

    @property
    def spare_bytes(self) -> int:
        """Bytes left under the usable budget (0 when it does not fit)."""
        return max(self.headroom_bytes, 0)

    @property
    def short_bytes(self) -> int:
        """Bytes over the usable budget (0 when it fits)."""
        return max(-self.headroom_bytes, 0)

    def describe(self) -> str:
        """``fits 24 GB RTX 4090 (21.6 GiB usable at margin 10%): yes, 3.2 GiB spare`` (or ``no, 4.1 GiB short``)."""
        usable = format_gib(self.usable_bytes, 1)
        head = f"fits {self.gpu.display} ({usable} usable at margin {margin_text(self.margin)})"
        if self.fits:
            return f"{head}: yes, {format_gib(self.spare_bytes, 1)} spare"
        return f"{head}: no, {format_gib(self.short_bytes, 1)} short"


def fit_verdict(device_bytes: float, gpu: Gpu, margin: float = FIT_MARGIN) -> Fit:
    """Does a rank needing ``device_bytes`` fit ``gpu`` keeping ``margin`` of its memory free?"""
    if isinstance(device_bytes, bool) or not isinstance(device_bytes, (int, float)) or not device_bytes >= 0:
        raise ValueError(f"device_bytes must be a non-negative number of bytes, got {device_bytes!r}")
    need = math.ceil(device_bytes)
    usable = usable_bytes(gpu.memory_bytes, margin)
    return Fit(gpu=gpu, device_bytes=need, margin=float(margin), usable_bytes=usable, headroom_bytes=usable - need)

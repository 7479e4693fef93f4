"""Which calibration file fits a GPU, torch and DeepSpeed: ``data/calibration/<gpu>-torch<ver>-ds<ver>.json``.

``zeroest report --fit`` writes one file per GPU model x torch x DeepSpeed version group it measured (versions
cut to major.minor: the caching allocator and DeepSpeed's buffers change between minor releases, not patch
ones); ``find_calibration`` reads the one for a given environment back as ``Overheads``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from zeroest.estimator.core.overheads import Overheads, calibration_dir, load_calibration

log = logging.getLogger(__name__)


def gpu_slug(gpu_name: str) -> str:
    """``"NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"``: lower case, other characters to one dash."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name.strip().lower()).strip("-")
    if not slug:
        raise ValueError(f"GPU name {gpu_name!r} has no letters or digits to name a calibration file by")
    return slug


def short_version(version: str | None) -> str:
    """``"2.5.1+cu124" -> "2.5"``, ``"0.16.3" -> "0.16"``; ``"unknown"`` when the version is missing."""
    if not version:
        return "unknown"
    match = re.match(r"^\s*(\d+)(?:\.(\d+))?", str(version))
    if not match:
        return gpu_slug(str(version))
    return f"{match.group(1)}.{match.group(2) or 0}"


def calibration_name(gpu_name: str, torch_version: str | None, ds_version: str | None) -> str:
    """The file name for one group: ``nvidia-h100-80gb-hbm3-torch2.5-ds0.16.json``."""
    return f"{gpu_slug(gpu_name)}-torch{short_version(torch_version)}-ds{short_version(ds_version)}.json"


def find_calibration(gpu_name: str, torch_version: str | None, ds_version: str | None,
                     directory: Path | None = None) -> Overheads | None:
    """Fitted overheads for this GPU, torch and DeepSpeed (major.minor), or None when none were fitted for it.

    Only an exact group is used: overheads fitted under another torch or DeepSpeed release are not silently
    applied. A file that exists but cannot be read raises ValueError (see ``load_calibration``).
    """
    folder = directory or calibration_dir()
    path = folder / calibration_name(gpu_name, torch_version, ds_version)
    if not path.is_file():
        log.debug("no calibration %s; using default overheads", path)
        return None
    return load_calibration(path)

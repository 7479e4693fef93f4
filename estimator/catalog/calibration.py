"""Which calibration file fits a GPU, torch and DeepSpeed: ``data/calibration/<gpu>-torch<ver>-ds<ver>.json``.

``zeroest report --fit --write-calibration data/calibration``
writes one file per GPU model x torch x DeepSpeed version group it measured (versions
cut to major.minor: the caching allocator and DeepSpeed's buffers change between minor releases, not patch
ones); ``find_calibration`` reads the one for a given environment back as ``Overheads``, through ``files.load_json``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import fields
from pathlib import Path

from zeroest.estimator.catalog.files import data_path, load_json
from zeroest.estimator.core.overheads import Overheads

log = logging.getLogger(__name__)


def calibration_dir() -> Path:
    """``data/calibration`` of the ``zeroest.data`` package."""
    return data_path("calibration")


RETIRED_RESERVED = ("reserved_fraction_of_transient",)
"""Overheads of the reserved model before ``core.reserved`` (a fraction of the peak plus one of the transient). A
file that holds one was fitted for that model: its reserved values are dropped for the defaults (its
``reserved_fraction_of_peak`` meant something else), with a warning to fit the file again."""
OLD_RESERVED = ("reserved_fraction_of_peak", "reserved_fixed_bytes", *RETIRED_RESERVED)


def load_calibration(path: Path) -> Overheads:
    """Overheads from a calibration JSON (``{"overheads": {...}, "fitted_on": ..., "errors": ...}``, or the bare
    mapping of overheads); an unknown name or a value that is not a number is a ValueError naming the file. A
    file fitted for the retired reserved model (``RETIRED_RESERVED``) keeps its other overheads."""
    data = load_json(path, "calibration")
    values = data.get("overheads", data)
    if not isinstance(values, dict):
        raise ValueError(f"{path}: 'overheads' must be an object of named overheads; fix the file")
    if any(name in values for name in RETIRED_RESERVED):
        log.warning("calibration %s was fitted for the retired reserved model: its reserved overheads are "
                    "replaced by the defaults; fit it again (zeroest report RUNS --fit --write-calibration)", path)
        values = {k: v for k, v in values.items() if k not in OLD_RESERVED}
    known = {f.name for f in fields(Overheads)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"calibration {path} has unknown overheads {sorted(unknown)}; known: {sorted(known)}")
    numbers = {k: v for k, v in values.items() if k != "source"}
    bad = sorted(k for k, v in numbers.items() if isinstance(v, bool) or not isinstance(v, (int, float)))
    if bad:
        raise ValueError(f"calibration {path}: {', '.join(bad)} must be numbers; fix the file")
    return Overheads(**{**values, "source": path.name})


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

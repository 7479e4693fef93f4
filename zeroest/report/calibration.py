"""``zeroest report --fit --write-calibration PATH``: the fitted overheads of each GPU group as calibration JSON.

The files are reproducible byte for byte: the same runs files give the same bytes (keys sorted, floats to
``FLOAT_DIGITS`` significant digits, no timestamps, runs files named relative to the working directory or to
their common folder, never by an absolute path). They are read back by
``zeroest.estimator.catalog.calibration.find_calibration``.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from zeroest.report.analysis import Analysis, GroupFit
from zeroest.report.fit import QUANTITIES

FLOAT_DIGITS = 12
"""Significant digits of every float written: below what the fit resolves, above what any figure shows."""


def _rounded(value: object) -> object:
    if isinstance(value, float):
        return float(f"{value:.{FLOAT_DIGITS}g}")
    if isinstance(value, dict):
        return {str(k): _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def canonical_json(document: object) -> str:
    """``document`` as JSON text that depends on its content only: sorted keys, rounded floats, one space
    indent, a final newline; ValueError for NaN or infinity."""
    return json.dumps(_rounded(document), sort_keys=True, indent=1, allow_nan=False) + "\n"


def relative_names(paths: list[Path]) -> list[str]:
    """The paths, sorted, relative to the working directory when all lie below it, else to the folder above
    their common folder (so each keeps the name of the folder it sits in); POSIX separators."""
    resolved = [p.resolve() for p in paths]
    if not resolved:
        return []
    cwd = Path.cwd().resolve()
    if all(p.is_relative_to(cwd) for p in resolved):
        base = cwd
    else:
        base = Path(os.path.commonpath([p.parent for p in resolved])).parent
    return sorted(p.relative_to(base).as_posix() for p in resolved)


def calibration_document(a: Analysis, group: GroupFit) -> dict:
    """The JSON of one group's calibration file: {"overheads", "fitted_on", "errors"}."""
    import zeroest

    env = group.env
    recs = [r for r in a.compared if r.env.group == group.group]
    errors: dict = {b: {q: a.stats(b, q, recs).to_dict() for q in QUANTITIES}
                    for b in ("defaults", "in_sample", "held_out") if a.predictions.get(b)}
    errors["held_out_note"] = group.cv_note
    return {
        "overheads": {k: v for k, v in group.result.overheads.to_dict().items() if k != "source"},
        "fitted_on": {
            "gpu": env.gpu_name, "torch": env.torch_version, "deepspeed": env.ds_version,
            "zeroest_version": zeroest.__version__, "rows": group.rows,
            "runs": len({r.row.run_key for r in recs}), "models": list(group.models),
            "fitted": list(group.result.fitted), "held": list(group.result.held),
            "notes": list(group.result.notes),
            "files": relative_names(sorted({r.row.source for r in recs})),
        },
        "errors": errors,
    }


def calibration_targets(a: Analysis, path: Path) -> list[tuple[GroupFit, Path]]:
    """Where each GPU group that fitted something goes: ``path`` itself when it ends in .json (one group
    only), else ``path/<group>.json``. CPU groups are never written (predict is for GPUs). ValueError when
    there is nothing to write, or several groups for one file."""
    from zeroest.estimator.catalog.calibration import calibration_name

    groups = [g for g in a.fits if g.env.gpu_name and g.result.fitted]
    if not groups:
        raise ValueError(f"--write-calibration {path}: no GPU group had anything to fit (CPU runs are never "
                         "calibrated); measure on a GPU first")
    if path.suffix == ".json":
        if len(groups) > 1:
            names = ", ".join(g.group for g in groups)
            raise ValueError(f"--write-calibration {path}: {len(groups)} GPU groups were fitted ({names}); pass "
                             "a folder to get one <group>.json each")
        return [(groups[0], path)]
    return [(g, path / calibration_name(g.env.gpu_name, g.env.torch_version, g.env.ds_version)) for g in groups]


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and one rename (no half-written file is ever
    seen)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_calibrations(a: Analysis, path: Path) -> Analysis:
    """Write the calibration files (``calibration_targets``); returns the analysis with the paths
    recorded. ValueError as ``calibration_targets``, OSError when a file cannot be written."""
    targets = calibration_targets(a, path)
    for group, target in targets:
        write_text(target, canonical_json(calibration_document(a, group)))
    written = {g.group: target for g, target in targets}
    return replace(a, fits=tuple(replace(g, path=written[g.group]) if g.group in written else g for g in a.fits))

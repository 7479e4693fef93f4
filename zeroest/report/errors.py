"""Prediction error statistics: signed relative error, its median and largest magnitude, under-prediction
rate.

The error of one prediction is ``(predicted - measured) / measured``: +0.03 means 3% too much memory
predicted, -0.03 means 3% too little. An under-prediction is the dangerous kind: a run the estimate said would
fit can run out of memory, so ``under_prediction_rate`` is reported beside the size of the errors. Pure: no
I/O, no torch.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

UNDER_TOLERANCE = 1e-6
"""An error below ``-UNDER_TOLERANCE`` counts as an under-prediction; smaller misses (80 KB of 80 GB) are
rounding of fitted values, not a risk."""


def relative_error(predicted_bytes: int | float, measured_bytes: int | float) -> float:
    """``(predicted - measured) / measured``; ValueError for a measurement that is not positive."""
    if not measured_bytes or measured_bytes <= 0:
        raise ValueError(f"a relative error needs a positive measurement, got {measured_bytes!r}")
    return (float(predicted_bytes) - float(measured_bytes)) / float(measured_bytes)


@dataclass(frozen=True, kw_only=True)
class ErrorStats:
    """Summary of signed relative errors of one quantity over a set of runs (fractions: 0.02 is 2%)."""

    n: int
    """Number of compared predictions."""
    median_abs_error: float | None
    """Median of ``|error|``; None when ``n`` is 0."""
    max_abs_error: float | None
    """Largest ``|error|``; None when ``n`` is 0."""
    mean_error: float | None
    """Mean signed error: the bias (positive: the estimate predicts too much on average)."""
    under_prediction_rate: float | None
    """Fraction of predictions below the measurement (an OOM the user did not see coming)."""

    def to_dict(self) -> dict:
        return asdict(self)


EMPTY = ErrorStats(n=0, median_abs_error=None, max_abs_error=None, mean_error=None,
                   under_prediction_rate=None)


def error_stats(errors: Iterable[float]) -> ErrorStats:
    """Statistics of signed relative errors (NaN and None entries are ignored)."""
    values = [float(e) for e in errors if e is not None and not math.isnan(e)]
    if not values:
        return EMPTY
    magnitudes = [abs(e) for e in values]
    return ErrorStats(
        n=len(values),
        median_abs_error=statistics.median(magnitudes),
        max_abs_error=max(magnitudes),
        mean_error=statistics.fmean(values),
        under_prediction_rate=sum(e < -UNDER_TOLERANCE for e in values) / len(values),
    )


def grouped_stats(items: Sequence, key: Callable[[object], object],
                  error: Callable[[object], float | None]) -> dict[str, ErrorStats]:
    """``error_stats`` per value of ``key(item)`` (values sorted as text, numbers in numeric order)."""
    groups: dict[object, list[float]] = {}
    for item in items:
        value = error(item)
        if value is not None:
            groups.setdefault(key(item), []).append(value)

    def order(k: object) -> tuple:
        numeric = isinstance(k, (int, float)) and not isinstance(k, bool)
        return (0, float(k), "") if numeric else (1, 0.0, str(k))

    return {str(k): error_stats(groups[k]) for k in sorted(groups, key=order)}


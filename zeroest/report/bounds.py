"""Reserved and device memory on the runs that matter for a fit verdict, and conservative overheads for GPUs
with no calibration file.

``LARGE_RUN_BYTES``: issue 12 holds reserved memory to its targets (median <= 3%, max <= 10%) on runs of 4 GiB
and more, where a fraction of the peak is what the caching allocator adds; below that, fixed segments dominate.

``conservative_overheads``: the reserved and device overheads that never under-predict any measured row given:
the named allocator terms of ``estimator.core.reserved`` as fitted, no constant, and the fraction f_p on top of
them raised until it covers every row; then one CUDA context (``overheads.device_from``):

    f   = max over rows of the least f_p with R(f_p) >= R_m    (R_m measured peak reserved, R the predicted one;
                                                                R grows with f_p, so a bisection finds it)
    ctx = max over rows of (D_m - R(f) - nccl)                (D_m measured device memory, nccl the row's NCCL)

They are bounds on the rows measured, not a promise for other setups; ``zeroest report --fit`` prints them per
group so the documentation of uncalibrated GPUs can quote a command.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from zeroest.estimator.core.overheads import Overheads, device_from
from zeroest.estimator.units import GiB, MiB
from zeroest.report.fit import Sample, predict_sample

LARGE_RUN_BYTES = 4 * GiB
"""Measured peak reserved from which a run counts for the reserved targets."""


def large_runs(records: Sequence) -> list:
    """Records (``report.join.Record``, finished runs) whose measured peak reserved is at least
    ``LARGE_RUN_BYTES``."""
    return [r for r in records if (r.measured.get("peak_reserved") or 0) >= LARGE_RUN_BYTES]


@dataclass(frozen=True, kw_only=True)
class Bound:
    """Overheads that cover every given row, and the rows that set them."""

    overheads: Overheads
    reserved_rows: int
    device_rows: int
    reserved_key: str | None
    """The row that sets ``reserved_fraction_of_peak`` (None when no row measured reserved memory)."""
    device_key: str | None


FRACTION_CEILING = 2.0
"""The largest ``reserved_fraction_of_peak`` the bound searches (``report.fit.BOUNDS``)."""


def _least_fraction(sample: Sample, flat: Overheads, measured: int) -> float:
    """The least f_p (to 1e-4, at most ``FRACTION_CEILING``) at which ``sample``'s predicted reserved covers
    ``measured``, before the card's cap (``core.reserved`` ``card_limit``): no fraction lifts a reserve the card
    caps, and an emulated card's cap (``validate.emulate``, the default CUDA context) lies up to the difference
    of the two contexts above the cap computed with a fitted one."""
    if sample.facts is not None and sample.facts.card_bytes:
        sample = replace(sample, facts=replace(sample.facts, card_bytes=0))

    def covers(f: float) -> bool:
        return predict_sample(sample, replace(flat, reserved_fraction_of_peak=f))["peak_reserved"] >= measured

    if covers(0.0):
        return 0.0
    lo, hi = 0.0, FRACTION_CEILING
    while hi - lo > 1e-4:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if covers(mid) else (mid, hi)
    return hi


def conservative_overheads(samples: Sequence[Sample], base: Overheads) -> Bound:
    """``base`` with ``reserved_fraction_of_peak`` and ``cuda_context_bytes`` raised to cover every sample
    (fraction rounded up to 1e-3, context to a MiB; neither below ``base``'s), the reserved constant set to 0
    and the other reserved terms as ``base`` has them."""
    flat = replace(base, reserved_fraction_of_peak=0.0, reserved_fixed_bytes=0)
    fraction, reserved_key, n_res = _largest_need(
        samples, "peak_reserved", base.reserved_fraction_of_peak,
        lambda s, measured: _least_fraction(s, flat, measured))
    wide = replace(flat, reserved_fraction_of_peak=math.ceil(fraction * 1000) / 1000, cuda_context_bytes=0)

    def context_need(s: Sample, measured: int) -> float:
        reserved = predict_sample(s, wide)["peak_reserved"]
        return measured - device_from(reserved, wide, peers=s.peers, real_comm=s.real_comm)

    context, device_key, n_dev = _largest_need(samples, "device", base.cuda_context_bytes, context_need)
    overheads = replace(wide, cuda_context_bytes=math.ceil(context / MiB) * MiB,
                        source="conservative bound: never under-predicts the rows it was taken on")
    return Bound(overheads=overheads, reserved_rows=n_res, device_rows=n_dev, reserved_key=reserved_key,
                 device_key=device_key)


def _largest_need(samples: Sequence[Sample], quantity: str, floor: float,
                  need: Callable[[Sample, int], float]) -> tuple[float, str | None, int]:
    """(the largest ``need(sample, measured)`` over the samples that measured ``quantity``, not below ``floor``;
    the key of the sample that set it, None where none rose above ``floor``; how many samples measured it)."""
    largest, key, n = floor, None, 0
    for s in samples:
        measured = s.measured.get(quantity)
        if not measured:
            continue
        n += 1
        value = need(s, measured)
        if value > largest:
            largest, key = value, s.key
    return largest, key, n

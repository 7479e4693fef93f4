"""Conservative overheads (zeroest/report/bounds.py): the smallest reserved fraction of the peak and CUDA context
that under-predict no row, from named terms."""

from __future__ import annotations

from dataclasses import replace

import pytest
from zeroest.estimator.core.overheads import Overheads, device_from
from zeroest.estimator.units import GiB, MiB

from zeroest.report.bounds import LARGE_RUN_BYTES, conservative_overheads, large_runs
from zeroest.report.fit import PhaseTerms, Sample, predict_sample

BASE = Overheads(cuda_context_bytes=500 * MiB, cublas_workspace_bytes=64 * MiB, nccl_communicator_bytes=400 * MiB,
                 reserved_fraction_of_peak=0.1, reserved_fraction_of_activations=0.05, reserved_fixed_bytes=0)


def _sample(key, other_gib, reserved_gib, device_gib, real_comm=False):
    # one step phase: other bytes only (no activations), so the predicted peak is other + cuBLAS workspace
    phases = (PhaseTerms(name="step", other_bytes=int(other_gib * GiB), activation_bytes=0, temporaries_bytes=0),)
    return Sample(key=key, group=key, phases=phases, peers=0, real_comm=real_comm,
                  measured={"peak_reserved": int(reserved_gib * GiB), "device": int(device_gib * GiB)})


def test_the_fraction_and_the_context_cover_the_worst_row():
    samples = [_sample("a", 10, 12, 13), _sample("b", 20, 30, 31.5), _sample("c", 8, 8.5, 9.9, real_comm=True)]
    bound = conservative_overheads(samples, BASE)
    oh = bound.overheads
    # row b: peak P = 20 GiB + 64 MiB, no activations or flat step buffers (no facts): reserved = (1 + f) P
    # rounded up to 2 MiB, so f = (30 GiB - P) / P, found by bisection and rounded up to 1e-3
    peak = 20 * GiB + 64 * MiB
    assert oh.reserved_fraction_of_peak == pytest.approx(0.496, abs=1e-3)  # (30 - 20.0625) / 20.0625 = 0.4953
    assert oh.reserved_fraction_of_peak >= (30 * GiB - peak) / peak
    assert bound.reserved_key == "b" and oh.reserved_fixed_bytes == 0
    assert oh.reserved_fraction_of_activations == BASE.reserved_fraction_of_activations  # the named terms stay
    # context: the largest measured device - (reserved + NCCL) over rows; row c carries a real communicator
    for s in samples:
        reserved = predict_sample(s, oh)["peak_reserved"]
        assert device_from(reserved, oh, peers=0, real_comm=s.real_comm) >= s.measured["device"]
        assert predict_sample(s, oh)["peak_reserved"] >= s.measured["peak_reserved"]
    assert oh.cuda_context_bytes % MiB == 0 and bound.device_key in {"a", "b", "c"}


def test_a_base_that_already_covers_the_rows_is_kept():
    wide = replace(BASE, reserved_fraction_of_peak=0.6, cuda_context_bytes=4 * GiB)
    bound = conservative_overheads([_sample("a", 10, 12, 13)], wide)
    assert bound.reserved_key is None and bound.device_key is None
    assert bound.overheads.reserved_fraction_of_peak == 0.6 and bound.overheads.cuda_context_bytes == 4 * GiB


def test_large_runs_keep_rows_of_4_gib_reserved_and_more():
    from types import SimpleNamespace

    rows = [SimpleNamespace(measured={"peak_reserved": LARGE_RUN_BYTES - 1}),
            SimpleNamespace(measured={"peak_reserved": 4 * GiB}), SimpleNamespace(measured={"peak_reserved": None})]
    assert large_runs(rows) == [rows[1]]

"""Emulated cards: the allocator cap and DeepSpeed's free memory (validate/emulate.py), packing, the CLI flag."""

import types

import pytest
from zeroest.estimator.core.overheads import Overheads
from zeroest.estimator.units import GiB, MiB
from zeroest.validate.jobs import PACKING_MARGIN, PACKING_SLACK_BYTES, Run

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")

CARD = 24564 * MiB
TOTAL = 143771 * MiB


@pytest.fixture
def fake_cuda(monkeypatch):
    calls = {}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=TOTAL))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, i: calls.update(fraction=f))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 3 * GiB)
    return calls


def test_cap_and_free_memory_follow_the_card(fake_cuda, monkeypatch):
    from deepspeed.accelerator import get_accelerator
    from zeroest.validate import emulate as em
    from zeroest.validate import measure

    monkeypatch.setattr(measure._Nvml, "used", lambda self: (None, None))  # NVML cannot list processes
    accel = get_accelerator()
    monkeypatch.setattr(accel, "available_memory", accel.available_memory)  # restored after the test
    info = em.emulate(CARD, 0)
    ctx = Overheads().cuda_context_bytes
    assert fake_cuda["fraction"] == pytest.approx((CARD - ctx) / TOTAL)
    assert info == {"memory_bytes": CARD, "fraction": fake_cuda["fraction"], "context_bytes": ctx,
                    "total_bytes": TOTAL}
    assert get_accelerator().available_memory() == CARD - ctx - 3 * GiB
    monkeypatch.setattr(measure._Nvml, "used", lambda self: (5 * GiB, "process"))
    assert get_accelerator().available_memory() == CARD - 5 * GiB


def test_a_card_larger_than_the_gpu_is_refused(fake_cuda):
    from zeroest.validate.emulate import emulate

    with pytest.raises(ValueError, match="cannot emulate"):
        emulate(TOTAL + 1, 0)


@pytest.mark.parametrize("device_gib, card, expect_gib", [(40, CARD, CARD / GiB), (10, CARD, None), (40, None, None)])
def test_packing_is_capped_at_the_emulated_card(device_gib, card, expect_gib):
    setup = {"gpus_per_node": 1, "gpu_memory_bytes": card}
    run = Run(key="k", setup=setup, simulated=True, launcher="torchrun", spec={}, prediction_error=None,
              prediction={"device_bytes": device_gib * GiB})
    raw = int(device_gib * GiB * PACKING_MARGIN) + PACKING_SLACK_BYTES
    assert run.need_bytes == (min(raw, int(expect_gib * GiB) + PACKING_SLACK_BYTES) if expect_gib else raw)


def test_cli_flag_becomes_the_setup_key():
    from zeroest.cli.validate import _emulated

    assert _emulated("4090", cpu=False) == [f"gpu_memory_bytes={CARD}"]
    assert _emulated(None, cpu=True) == []
    with pytest.raises(ValueError, match="drop --cpu"):
        _emulated("4090", cpu=True)

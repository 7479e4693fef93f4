"""validate.measure.Meter keeps a phase's peaks across resets made by other code (DeepSpeed's
runtime/utils.py ``empty_cache`` resets them before each ZeRO-1/2 parameter group's flatten), on a faked CUDA
allocator: ``torch.cuda.memory_stats`` and ``reset_peak_memory_stats`` answered by a counter."""

import pytest
import torch
import torch.cuda.memory as cuda_memory
from zeroest.validate import measure

GiB = 2**30


class FakeAllocator:
    """current / peak bytes of the two counters the meter reads; a reset sets each peak to its current value."""

    def __init__(self) -> None:
        self.current = {"allocated": 0, "reserved": 0}
        self.peak = dict(self.current)

    def set(self, allocated: int, reserved: int) -> None:
        self.current = {"allocated": allocated, "reserved": reserved}
        self.peak = {k: max(self.peak[k], v) for k, v in self.current.items()}

    def stats(self, device=None) -> dict:
        return {"allocated_bytes.all.current": self.current["allocated"],
                "allocated_bytes.all.peak": self.peak["allocated"],
                "reserved_bytes.all.current": self.current["reserved"],
                "reserved_bytes.all.peak": self.peak["reserved"]}

    def reset(self, device=None) -> None:
        self.peak = dict(self.current)


@pytest.fixture
def fake(monkeypatch):
    allocator = FakeAllocator()
    monkeypatch.setattr(torch.cuda, "memory_stats", allocator.stats)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(cuda_memory, "reset_peak_memory_stats", allocator.reset)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", allocator.reset)
    monkeypatch.setattr(measure, "_FOLDS", [])
    monkeypatch.setattr(measure, "_pinned_bytes", lambda: None)
    return allocator


def test_a_reset_inside_the_phase_keeps_the_phase_peak(fake):
    meter = measure.Meter(torch.device("cuda", 0))
    fake.set(12 * GiB, 14 * GiB)                      # before the phase: its own reset starts from here
    with meter.phase("init"):
        fake.set(24 * GiB, 26 * GiB)                  # group 0 flattened on the device: model + flat copy
        fake.set(6 * GiB, 7 * GiB)                    # the model's tensors freed, DeepSpeed's empty_cache ...
        torch.cuda.reset_peak_memory_stats()          # ... and its reset, through torch.cuda
        fake.set(8 * GiB, 9 * GiB)                    # group 1's flatten, the peak the counters alone would give
        cuda_memory.reset_peak_memory_stats(0)        # a reset through torch.cuda.memory's name
        fake.set(7 * GiB, 9 * GiB)
    record = meter.phases["init"]
    assert record["peak_allocated_bytes"] == 24 * GiB and record["peak_reserved_bytes"] == 26 * GiB
    assert record["allocated_bytes"] == 7 * GiB and record["reserved_bytes"] == 9 * GiB
    assert record["peak_resets"] == 2


def test_the_meters_own_reset_starts_each_phase_afresh(fake):
    meter = measure.Meter(torch.device("cuda", 0))
    with meter.phase("init"):
        fake.set(20 * GiB, 20 * GiB)
        torch.cuda.reset_peak_memory_stats()
        fake.set(5 * GiB, 20 * GiB)
    with meter.phase("step0.forward0"):              # a new phase: the init's folded peak is not carried over
        fake.set(9 * GiB, 20 * GiB)
    record = meter.phases["step0.forward0"]
    assert record["peak_allocated_bytes"] == 9 * GiB and record["peak_resets"] == 0
    assert meter.phases["init"]["peak_allocated_bytes"] == 20 * GiB


def test_the_guard_is_installed_once(fake):
    measure.Meter(torch.device("cuda", 0))
    guard = torch.cuda.reset_peak_memory_stats
    measure.Meter(torch.device("cuda", 0))
    assert torch.cuda.reset_peak_memory_stats is guard and cuda_memory.reset_peak_memory_stats is guard
    assert guard._zeroest_original == fake.reset

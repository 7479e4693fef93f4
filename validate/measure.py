"""The one place that reads memory during a validation run, so every path (torchrun, accelerate, deepspeed
launcher, simulated, CPU) measures the same way.

A ``Meter`` records phases. For each phase it resets the peaks first
(``torch.cuda.reset_peak_memory_stats``), runs the block, synchronizes, then reads (torchtitan's
``components/metrics.py`` reads the same ``memory_stats`` keys):

* ``allocated_bytes`` / ``peak_allocated_bytes``: ``allocated_bytes.all.current`` / ``.peak`` (tensors alive);
* ``reserved_bytes`` / ``peak_reserved_bytes``: ``reserved_bytes.all.current`` / ``.peak`` (the caching
  allocator's segments);
* ``num_alloc_retries`` / ``num_ooms``: cumulative counts since the process started;
* ``nvml_bytes``: what nvidia-smi shows for this process (``nvmlDeviceGetComputeRunningProcesses``), or the
  device's whole used memory when the process is not listed (containers with their own pid namespace):
  ``nvml_scope`` says which;
* ``rss_bytes``: host resident memory (psutil); ``time_s``: wall time of the phase;
* ``pinned_bytes``: page-locked host memory torch's host caching allocator holds, blocks in use and cached, at
  their power-of-two sizes (``torch.cuda.host_memory_stats()["allocated_bytes.current"]``; None on the CPU or
  a torch without it). It is part of ``rss_bytes``.

Peaks survive other code's resets. DeepSpeed resets the allocator's peaks inside ``deepspeed.initialize``:
runtime/utils.py ``empty_cache`` calls ``reset_peak_memory_stats`` after ``empty_cache``, and stage_1_and_2.py
``DeepSpeedZeroOptimizer.__init__`` calls it before each parameter group's flatten. Read as they are, the init's
peaks would be those after the last group's reset: with the HF Trainer's two groups, the small no-decay group's
flatten, not the first group's, where the model and its flat copy are both on the device. So while a phase runs,
``torch.cuda.reset_peak_memory_stats`` (and ``torch.cuda.memory``'s, which torch's deprecated ``reset_max_*``
call) first fold the current peaks into the phase's (``PeakFold``); the record's peaks are the larger of the folded
ones and the counters at the phase's end, and ``peak_resets`` counts the resets folded.

On the CPU there is no caching allocator: ``CpuMeter`` counts live tensor storages with
``validate.memtrack.LiveBytes`` (reserved and NVML fields are None).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

INJECT_OOM_ENV = "ZEROEST_INJECT_OOM"
"""Test hook: a phase name (or prefix such as ``step0.backward``); entering it raises
``torch.OutOfMemoryError``."""


def _pinned_bytes() -> int | None:
    if not torch.cuda.is_available() or not hasattr(torch.cuda, "host_memory_stats"):
        return None
    try:
        return int(torch.cuda.host_memory_stats().get("allocated_bytes.current", 0))
    except Exception:  # an older torch without these keys, or no pinned allocator yet
        return None


def _rss_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # psutil missing or unreadable /proc
        return None


class _Nvml:
    """NVML reader for one CUDA device; silent (None) where NVML is missing."""

    def __init__(self, device: torch.device) -> None:
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            try:
                index = torch.cuda._get_nvml_device_index(device)  # maps CUDA_VISIBLE_DEVICES to NVML's order
            except Exception:
                index = device.index or 0
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.pynvml = pynvml
        except Exception as exc:  # no driver library, no permission
            log.info("NVML unavailable (%s); nvml_bytes will be null", exc)

    def used(self) -> tuple[int | None, str | None]:
        """(bytes, scope): this process's memory as nvidia-smi lists it, else the device's used memory."""
        if self.handle is None:
            return None, None
        pid = os.getpid()
        try:
            for proc in self.pynvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                if proc.pid == pid and proc.usedGpuMemory is not None:
                    return int(proc.usedGpuMemory), "process"
            return int(self.pynvml.nvmlDeviceGetMemoryInfo(self.handle).used), "device"
        except Exception:
            return None, None

    def total(self) -> int | None:
        if self.handle is None:
            return None
        try:
            return int(self.pynvml.nvmlDeviceGetMemoryInfo(self.handle).total)
        except Exception:
            return None


PEAK_KEYS: tuple[str, ...] = ("allocated_bytes.all.peak", "reserved_bytes.all.peak")


class PeakFold:
    """The largest peaks (``PEAK_KEYS`` of ``torch.cuda.memory_stats``) seen before any reset within one phase."""

    def __init__(self) -> None:
        self.peaks: dict[str, int] = {}
        self.resets = 0

    def clear(self) -> None:
        self.peaks, self.resets = {}, 0

    def fold(self, stats: dict) -> None:
        """Keep the larger of each folded peak and ``stats``' (called just before a reset)."""
        for key in PEAK_KEYS:
            self.peaks[key] = max(self.peaks.get(key, 0), int(stats.get(key, 0)))
        self.resets += 1

    def merged(self, stats: dict) -> dict:
        """``stats`` with each peak raised to the folded one."""
        return {**stats, **{key: max(int(stats.get(key, 0)), self.peaks.get(key, 0)) for key in PEAK_KEYS}}


_FOLDS: list[tuple[PeakFold, torch.device]] = []
"""The phase folds of this process's meters (one meter per worker process); the reset guard feeds them all."""


def _guard_resets() -> None:
    """Route ``torch.cuda.reset_peak_memory_stats`` (both names torch calls it by) through the folds, once per
    process: each reset first folds the current peaks of every meter's device."""
    import torch.cuda.memory as cuda_memory

    original = cuda_memory.reset_peak_memory_stats
    if getattr(original, "_zeroest_guard", False):
        return

    def reset_peak_memory_stats(device=None) -> None:
        for fold, meter_device in _FOLDS:
            with contextlib.suppress(Exception):
                fold.fold(torch.cuda.memory_stats(meter_device))
        original(device)

    reset_peak_memory_stats._zeroest_guard = True
    reset_peak_memory_stats._zeroest_original = original
    cuda_memory.reset_peak_memory_stats = reset_peak_memory_stats
    torch.cuda.reset_peak_memory_stats = reset_peak_memory_stats


class Meter:
    """Per-phase memory and time on a CUDA device. ``phases`` maps each phase name to its record (a plain
    dict)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.phases: dict[str, dict] = {}
        self.current: str | None = None
        self.nvml = _Nvml(device)
        self._inject = os.environ.get(INJECT_OOM_ENV) or None
        self.fold = PeakFold()
        _guard_resets()
        _FOLDS.append((self.fold, device))

    def _sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def _reset(self) -> None:
        reset = torch.cuda.reset_peak_memory_stats
        getattr(reset, "_zeroest_original", reset)(self.device)  # the meter's own reset folds nothing
        self.fold.clear()

    def _read(self) -> dict:
        stats = self.fold.merged(torch.cuda.memory_stats(self.device))
        nvml_bytes, scope = self.nvml.used()
        return {
            "allocated_bytes": int(stats.get("allocated_bytes.all.current", 0)),
            "peak_allocated_bytes": int(stats.get("allocated_bytes.all.peak", 0)),
            "reserved_bytes": int(stats.get("reserved_bytes.all.current", 0)),
            "peak_reserved_bytes": int(stats.get("reserved_bytes.all.peak", 0)),
            "num_alloc_retries": int(stats.get("num_alloc_retries", 0)),
            "num_ooms": int(stats.get("num_ooms", 0)),
            "peak_resets": self.fold.resets,
            "nvml_bytes": nvml_bytes,
            "nvml_scope": scope,
        }

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[dict]:
        """Measure the block as phase ``name``; the record is filled in even when the block raises."""
        with contextlib.suppress(Exception):
            self._sync()
        self._reset()
        record: dict = {}
        self.phases[name] = record
        self.current = name
        start = time.perf_counter()
        try:
            if self._inject and name.startswith(self._inject):
                raise torch.OutOfMemoryError(f"injected by {INJECT_OOM_ENV}={self._inject} in phase {name}")
            yield record
        finally:
            with contextlib.suppress(Exception):
                self._sync()
            record["time_s"] = time.perf_counter() - start
            record.update(self._read())
            record["rss_bytes"] = _rss_bytes()
            record["pinned_bytes"] = _pinned_bytes()

    def device_info(self) -> dict:
        """{"name", "memory_bytes", "capability"} of the device."""
        props = torch.cuda.get_device_properties(self.device)
        return {
            "name": props.name,
            "memory_bytes": int(self.nvml.total() or props.total_memory),
            "capability": f"{props.major}.{props.minor}",
        }


class CpuMeter(Meter):
    """The same phases on the CPU: live tensor bytes from ``LiveBytes`` stand in for the allocator's
    counters."""

    def __init__(self) -> None:
        from zeroest.validate.memtrack import LiveBytes

        self.device = torch.device("cpu")
        self.phases = {}
        self.current = None
        self.nvml = None
        self._inject = os.environ.get(INJECT_OOM_ENV) or None
        self.live = LiveBytes(device="cpu")

    def _sync(self) -> None:
        pass

    def _reset(self) -> None:
        self.live.peak_bytes = self.live.live_bytes

    def _read(self) -> dict:
        return {
            "allocated_bytes": int(self.live.live_bytes),
            "peak_allocated_bytes": int(self.live.peak_bytes),
            "reserved_bytes": None,
            "peak_reserved_bytes": None,
            "num_alloc_retries": None,
            "num_ooms": None,
            "nvml_bytes": None,
            "nvml_scope": None,
        }

    def device_info(self) -> dict:
        import platform

        return {"name": platform.processor() or platform.machine(), "cores": os.cpu_count()}


def is_oom(exc: BaseException) -> bool:
    """True for torch's OutOfMemoryError and for the RuntimeErrors that some kernels and DeepSpeed raise
    instead."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


SETUP_PHASES = ("build",)
"""Phases before DeepSpeed sees the model (building it). A whole model is built on the GPU only to run HF's
init fast, then moved to the host (``worker.build_model``), so that phase is no part of a training job's peaks;
a model built under ``deepspeed.zero.Init`` is built on the device exactly as in the job, and counts."""


def summarize(phases: dict[str, dict], *, with_build: bool = False) -> dict:
    """Overall peaks over the phases from ``init`` on (from ``build`` on with ``with_build``, for models built
    under zero.Init): the largest peak allocated / reserved, the largest NVML reading, the largest host RSS and
    the largest page-locked host memory."""
    skip = () if with_build else SETUP_PHASES
    phases = {name: record for name, record in phases.items() if name not in skip}

    def most(key: str) -> int | None:
        values = [p[key] for p in phases.values() if p.get(key) is not None]
        return max(values) if values else None

    return {
        "peak_allocated_bytes": most("peak_allocated_bytes"),
        "peak_reserved_bytes": most("peak_reserved_bytes"),
        "device_bytes": most("nvml_bytes"),
        "host_rss_bytes": most("rss_bytes"),
        "host_pinned_bytes": most("pinned_bytes"),
    }

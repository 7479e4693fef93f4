"""A dispatch-level memory tracker: live bytes and per-phase peaks of every tensor storage, on any device.

CUDA has ``torch.cuda.memory_stats()``; the CPU has no such counter, so CPU runs (tests, ``validate --cpu``) count
memory here instead. ``LiveBytes`` is a ``TorchDispatchMode``: every aten op's output storage seen for the first time
is added to the live total, and a ``weakref.finalize`` on the storage takes it off again when it is freed (torch keeps
one Python object per storage, so the finalizer runs exactly when the storage dies). Storages that existed before the
mode was entered can be adopted with ``adopt()`` so that the live total is the whole picture.

Views share their base's storage and are counted once; storage bytes are counted, not tensor bytes, so a
narrowed view of a flat buffer counts the whole buffer, as the allocator would.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


@dataclass
class PhasePeak:
    """Live bytes when a phase began and ended, and the most live at once during it."""

    start_bytes: int
    peak_bytes: int
    end_bytes: int = 0


@dataclass
class LiveBytes(TorchDispatchMode):
    """Counts the bytes of live tensor storages created under it (and of adopted ones).

    ``device``: count only storages on this device type ("cpu", "cuda", "meta"); None counts all.
    """

    device: str | None = None
    live_bytes: int = 0
    peak_bytes: int = 0
    phases: dict[str, PhasePeak] = field(default_factory=dict)
    _seen: dict[int, int] = field(default_factory=dict)
    _open: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    # -- counting -----------------------------------------------------------------------------------------------
    def _track(self, tensor: torch.Tensor) -> None:
        if self.device is not None and tensor.device.type != self.device:
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._seen:
            return
        nbytes = storage.nbytes()
        self._seen[key] = nbytes
        weakref.finalize(storage, self._release, key)
        self.live_bytes += nbytes
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
        for name in self._open:
            phase = self.phases[name]
            phase.peak_bytes = max(phase.peak_bytes, self.live_bytes)

    def _release(self, key: int) -> None:
        self.live_bytes -= self._seen.pop(key, 0)

    def adopt(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count tensors made before the mode was entered (model weights, say) as live."""
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)
        return out

    # -- phases -------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[PhasePeak]:
        """Record the peak of live bytes while the block runs (phases may nest; a name seen again is replaced)."""
        record = PhasePeak(start_bytes=self.live_bytes, peak_bytes=self.live_bytes)
        self.phases[name] = record
        self._open.append(name)
        try:
            yield record
        finally:
            self._open.remove(name)
            record.end_bytes = self.live_bytes


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer count once)."""
    seen: dict[tuple[str, int], int] = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            seen[(tensor.device.type, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())

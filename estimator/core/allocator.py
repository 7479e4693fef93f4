"""torch's caching allocator (c10/cuda/CUDACachingAllocator.cpp, torch 2.11, its defaults), fed a sequence of
requests: the reserve it holds and its peak. Pure Python, no torch.

``CachingAllocatorModel`` follows the allocator with no ``max_split_size_mb``, no ``roundup_power2_divisions``, no
garbage-collection threshold and expandable segments off:

* ``round_size``: requests round up to 512 bytes (``kMinBlockSize``);
* two pools: requests of at most 1 MiB (``kSmallSize``) take the small pool, others the large one, per stream;
* ``get_free_block``: the smallest free block of the pool and stream at least as large (best fit; torch breaks ties
  by address, the model by segment age and offset);
* ``get_allocation_size``: with none, a new segment of 2 MiB (small, ``kSmallBuffer``), 20 MiB for a large request
  under 10 MiB (``kLargeBuffer``, ``kMinLargeAlloc``), else the request rounded up to 2 MiB (``kRoundLarge``);
* ``should_split``: the block is split when what remains is at least 512 bytes (small pool) or more than 1 MiB
  (large); the remainder stays free in the same segment;
* ``free_block`` / ``try_merge_blocks``: a freed block merges with free neighbours of its segment;
* segments go back to the driver only on ``empty_cache`` (``release_cached_blocks``): every segment with no live
  block. DeepSpeed's runtime/utils.py ``empty_cache`` also resets the peak statistics
  (``reset_peak_memory_stats``): ``peak_reserved`` restarts there, as ``torch.cuda.max_memory_reserved()`` does,
  while ``run_peak_reserved`` keeps the peak of the whole run, as the validator's measurement does
  (``validate.measure``, peaks kept across the resets).

With a ``limit`` (the bytes the allocator may hold on the card: the card less the CUDA context and NCCL's
memory, or ``set_per_process_memory_fraction``'s ``allowed_memory_maximum``), a new segment that would pass it
fails (``alloc_block``); ``malloc`` then calls ``release_available_cached_blocks``, which does nothing without
``max_split_size_mb``, and ``release_cached_blocks``: every segment with no live block goes back to the driver and
the segment is tried again (``num_alloc_retries`` += 1, ``retries`` here); if it still passes the limit the
request fails (``OutOfMemory``). Without a limit the reserve grows past any card.
Held against whole recorded runs in benchmarks/allocator_replay.py (docs/DEVICE_RUNS.md, ninth session).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

MIN_BLOCK = 512
SMALL_SIZE = 1 << 20
SMALL_BUFFER = 2 << 20
LARGE_BUFFER = 20 << 20
MIN_LARGE_ALLOC = 10 << 20
ROUND_LARGE = 2 << 20


def round_size(size: int) -> int:
    return MIN_BLOCK if size < MIN_BLOCK else -(-size // MIN_BLOCK) * MIN_BLOCK


def allocation_size(size: int) -> int:
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


class OutOfMemory(Exception):
    """A request the allocator cannot serve under its ``limit``, even with its cache given back."""


@dataclass(eq=False)
class Block:
    size: int
    segment: int
    offset: int
    stream: int
    small: bool
    free: bool = True
    prev: Block | None = None
    next: Block | None = None


@dataclass
class CachingAllocatorModel:
    """Reserved bytes of the default caching allocator over a sequence of ``malloc`` / ``free`` calls."""

    limit: int = 0
    """The most bytes the allocator may hold (0: no limit)."""
    retries: int = 0
    """Segments tried again after the cache was given back (``num_alloc_retries``)."""
    reserved: int = 0
    peak_reserved: int = 0
    """The peak since the last ``reset_peak`` (``torch.cuda.max_memory_reserved()``)."""
    run_peak_reserved: int = 0
    """The peak of the whole sequence, resets or not."""
    allocated: int = 0
    segments: int = 0
    _free: dict[tuple[int, bool], list[tuple[int, int, int, Block]]] = field(default_factory=dict)
    _serial: int = 0

    def _key(self, block: Block) -> tuple[int, int, int, Block]:
        return (block.size, block.segment, block.offset, block)

    def _insert(self, block: Block) -> None:
        pool = self._free.setdefault((block.stream, block.small), [])
        bisect.insort(pool, self._key(block), key=lambda k: k[:3])

    def _remove(self, block: Block) -> None:
        pool = self._free[(block.stream, block.small)]
        at = bisect.bisect_left(pool, (block.size, block.segment, block.offset), key=lambda k: k[:3])
        assert pool[at][3] is block
        del pool[at]

    def malloc(self, size: int, stream: int = 0) -> Block:
        size = round_size(size)
        small = size <= SMALL_SIZE
        pool = self._free.get((stream, small), [])
        at = bisect.bisect_left(pool, (size, -1, -1), key=lambda k: k[:3])
        if at < len(pool):
            block = pool.pop(at)[3]
        else:
            total = allocation_size(size)
            if self.limit and self.reserved + total > self.limit:  # alloc_block fails: release_cached_blocks
                self.empty_cache()
                self.retries += 1
                if self.reserved + total > self.limit:
                    raise OutOfMemory(f"a {total}-byte segment on {self.reserved} reserved passes {self.limit}")
            self._serial += 1
            self.segments += 1
            self.reserved += total
            self.peak_reserved = max(self.peak_reserved, self.reserved)
            self.run_peak_reserved = max(self.run_peak_reserved, self.reserved)
            block = Block(size=total, segment=self._serial, offset=0, stream=stream, small=small)
        remaining = block.size - size
        if remaining >= MIN_BLOCK if small else remaining > SMALL_SIZE:
            rest = Block(size=remaining, segment=block.segment, offset=block.offset + size, stream=stream, small=small,
                         prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            self._insert(rest)
        block.free = False
        self.allocated += block.size
        return block

    def empty_cache(self) -> None:
        """``emptyCache`` / ``release_cached_blocks``: every segment with no live block goes back to the driver."""
        for key, pool in self._free.items():
            whole = [k for k in pool if k[3].prev is None and k[3].next is None]
            self._free[key] = [k for k in pool if not (k[3].prev is None and k[3].next is None)]
            self.reserved -= sum(k[0] for k in whole)
            self.segments -= len(whole)

    def reset_peak(self) -> None:
        self.peak_reserved = self.reserved

    def free(self, block: Block) -> None:
        block.free = True
        self.allocated -= block.size
        for neighbour in (block.prev, block.next):
            if neighbour is not None and neighbour.free:
                self._remove(neighbour)
                if neighbour is block.prev:
                    block.offset, block.prev = neighbour.offset, neighbour.prev
                    if neighbour.prev is not None:
                        neighbour.prev.next = block
                else:
                    block.next = neighbour.next
                    if neighbour.next is not None:
                        neighbour.next.prev = block
                block.size += neighbour.size
        self._insert(block)

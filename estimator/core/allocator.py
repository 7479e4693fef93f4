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

With ``expandable=True`` (``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``) each pool of each stream is one range
of virtual addresses (``ExpandableSegment``) that maps physical pages as requests need them, 20 MiB in the large pool
and 2 MiB in the small one (``find_expandable_block``'s ``segment_size``: ``kLargeBuffer``, ``kSmallBuffer``); the
reserve is the pages mapped:

* ``get_free_block`` still takes the best-fitting free block, but ranks a free block that ends where unmapped
  addresses begin by the size it could grow to (``expandable_size``), so it is taken only when no other free block
  fits;
* with none, ``try_allocate_expandable_block``: ``find_expandable_block`` takes the lowest unmapped range that, with
  the free block just before it, is large enough; ``map_block`` maps the pages the request still lacks (rounded up to
  the page) and merges them with that free block;
* ``should_split`` splits any block whose remainder is at least 512 bytes, large pool too;
* ``release_cached_blocks`` (``empty_cache``, or a failed request under the ``limit``) unmaps the whole pages inside
  every free block (``unmap_block``): the slivers at its ends stay mapped and free, and later requests map pages into
  the hole again.

The ``limit`` is checked as ``alloc_block`` checks it under ``set_per_process_memory_fraction``: the reserve plus the
segment the default allocator would have cut for the request (``get_allocation_size``) may not pass it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zeroest.estimator.core.request_types import Sequence

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
    mapped: bool = True
    """False: addresses of an expandable segment with no pages behind them (never handed out)."""


VIRTUAL_BYTES = 1 << 50
"""The address range of one expandable segment: more than any card maps (torch reserves the card's memory and an
eighth; only the pages mapped count)."""


def _link_after(block: Block, new: Block) -> None:
    new.prev, new.next = block, block.next
    if block.next is not None:
        block.next.prev = new
    block.next = new


def _link_before(block: Block, new: Block) -> None:
    new.prev, new.next = block.prev, block
    if block.prev is not None:
        block.prev.next = new
    block.prev = new


def _page(small: bool) -> int:
    """The page an expandable segment maps at a time: ``kSmallBuffer`` in the small pool, ``kLargeBuffer`` else."""
    return SMALL_BUFFER if small else LARGE_BUFFER


def _unlink(block: Block) -> None:
    if block.prev is not None:
        block.prev.next = block.next
    if block.next is not None:
        block.next.prev = block.prev


@dataclass
class CachingAllocatorModel:
    """Reserved bytes of the default caching allocator over a sequence of ``malloc`` / ``free`` calls."""

    limit: int = 0
    """The most bytes the allocator may hold (0: no limit)."""
    expandable: bool = False
    """Expandable segments (module docstring) in place of the default segments."""
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
    _unmapped: dict[tuple[int, bool], list[tuple[int, Block]]] = field(default_factory=dict)
    """Per pool, its unmapped ranges by address (expandable segments only)."""
    _serial: int = 0

    def _hole_in(self, hole: Block) -> None:
        bisect.insort(self._unmapped[(hole.stream, hole.small)], (hole.offset, hole), key=lambda k: k[0])

    def _hole_out(self, hole: Block) -> None:
        unmapped = self._unmapped[(hole.stream, hole.small)]
        del unmapped[bisect.bisect_left(unmapped, hole.offset, key=lambda k: k[0])]

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
        block = self._best_fit(size, stream, small)
        if block is None:
            total = allocation_size(size)
            if self.limit and self.reserved + total > self.limit:  # alloc_block fails: release_cached_blocks
                self.empty_cache()
                self.retries += 1
                if self.reserved + total > self.limit:
                    raise OutOfMemory(f"a {total}-byte segment on {self.reserved} reserved passes {self.limit}")
            block = self._expand(size, stream, small) if self.expandable else self._segment(total, stream, small)
        remaining = block.size - size
        if remaining >= MIN_BLOCK if small or self.expandable else remaining > SMALL_SIZE:
            rest = Block(size=remaining, segment=block.segment, offset=block.offset + size, stream=stream, small=small)
            _link_after(block, rest)
            block.size = size
            self._insert(rest)
        block.free = False
        self.allocated += block.size
        return block

    def _best_fit(self, size: int, stream: int, small: bool) -> Block | None:
        """``get_free_block``: the smallest free block at least ``size``, taken out of the cache; with expandable
        segments a block that could grow into unmapped addresses ranks by that size (``expandable_size``)."""
        pool = self._free.get((stream, small), [])
        at = bisect.bisect_left(pool, (size, -1, -1), key=lambda k: k[:3])
        if at == len(pool):
            return None
        if self.expandable:
            def grows_to(b: Block) -> int:
                return b.size + (b.next.size if b.next is not None and not b.next.mapped else 0)

            while at + 1 < len(pool) and grows_to(pool[at + 1][3]) < grows_to(pool[at][3]):
                at += 1
        return pool.pop(at)[3]

    def _grow(self, total: int) -> None:
        self.reserved += total
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        self.run_peak_reserved = max(self.run_peak_reserved, self.reserved)

    def _segment(self, total: int, stream: int, small: bool) -> Block:
        """``alloc_block``: a new segment of ``total`` bytes (``cudaMalloc``)."""
        self._serial += 1
        self.segments += 1
        self._grow(total)
        return Block(size=total, segment=self._serial, offset=0, stream=stream, small=small)

    def _expand(self, size: int, stream: int, small: bool) -> Block:
        """``try_allocate_expandable_block``: the lowest unmapped range that, with the free block before it, holds
        ``size``, mapped page by page and merged with that block; taken out of the cache."""
        key = (stream, small)
        unmapped = self._unmapped.setdefault(key, [])
        if not unmapped:  # find_expandable_block: the pool's first expandable segment
            self._serial += 1
            self.segments += 1
            unmapped.append((0, Block(size=VIRTUAL_BYTES, segment=self._serial, offset=0, stream=stream, small=small,
                                      mapped=False)))

        def room(b: Block | None) -> int:
            got = 0
            while b is not None and b.free and got < size:
                got, b = got + b.size, b.next
            return got

        candidate = None
        for _, hole in unmapped:
            start = hole.prev if hole.prev is not None and hole.prev.free else hole
            if room(start) >= size:
                candidate = start
                break
        if candidate is None:  # past the end of the virtual range: more than any card
            raise OutOfMemory(f"no expandable range holds {size} bytes")
        if not candidate.mapped:
            candidate = self._map(candidate, size, small)
        while candidate.size < size:
            candidate = self._map(candidate.next, size - candidate.size, small)
        self._remove(candidate)
        return candidate

    def _map(self, hole: Block, size: int, small: bool) -> Block:
        """``map_block``: the pages covering the first ``size`` bytes of unmapped ``hole``, merged with a free
        neighbour before (and after) it; the mapped block, back in the cache."""
        page = _page(small)
        mapped = min(hole.size, -(-size // page) * page)
        self._hole_out(hole)
        if mapped < hole.size:
            rest = Block(size=hole.size - mapped, segment=hole.segment, offset=hole.offset + mapped,
                         stream=hole.stream, small=small, mapped=False)
            _link_after(hole, rest)
            self._hole_in(rest)
            hole.size = mapped
        hole.mapped = True
        self._grow(mapped)
        self._merge(hole)
        self._insert(hole)
        return hole

    def empty_cache(self) -> None:
        """``emptyCache`` / ``release_cached_blocks``: every segment with no live block goes back to the driver; with
        expandable segments, the whole pages inside every free block are unmapped (``unmap_block``)."""
        if self.expandable:
            for pool in list(self._free.values()):
                for _, _, _, block in list(pool):
                    self._unmap(block)
            return
        for key, pool in self._free.items():
            whole = [k for k in pool if k[3].prev is None and k[3].next is None]
            self._free[key] = [k for k in pool if not (k[3].prev is None and k[3].next is None)]
            self.reserved -= sum(k[0] for k in whole)
            self.segments -= len(whole)

    def _unmap(self, block: Block) -> None:
        page = _page(block.small)
        begin = -(-block.offset // page) * page
        end = (block.offset + block.size) // page * page
        if end <= begin:
            return
        self._remove(block)
        if begin > block.offset:  # the slivers of a page at either end stay mapped and free
            before = Block(size=begin - block.offset, segment=block.segment, offset=block.offset,
                           stream=block.stream, small=block.small)
            _link_before(block, before)
            self._insert(before)
        if end < block.offset + block.size:
            after = Block(size=block.offset + block.size - end, segment=block.segment, offset=end,
                          stream=block.stream, small=block.small)
            _link_after(block, after)
            self._insert(after)
        block.offset, block.size, block.mapped = begin, end - begin, False
        self.reserved -= end - begin
        for neighbour in (block.prev, block.next):
            if neighbour is not None and not neighbour.mapped:
                self._hole_out(neighbour)
                self._absorb(block, neighbour)
        self._hole_in(block)

    def reset_peak(self) -> None:
        self.peak_reserved = self.reserved

    def free(self, block: Block) -> None:
        block.free = True
        self.allocated -= block.size
        self._merge(block)
        self._insert(block)

    def _merge(self, block: Block) -> None:
        """``try_merge_blocks``: ``block`` takes in its free neighbours of the same kind (mapped or not), which leave
        the cache."""
        for neighbour in (block.prev, block.next):
            if neighbour is not None and neighbour.free and neighbour.mapped == block.mapped:
                self._remove(neighbour)
                self._absorb(block, neighbour)

    @staticmethod
    def _absorb(block: Block, neighbour: Block) -> None:
        if neighbour is block.prev:
            block.offset = neighbour.offset
        block.size += neighbour.size
        _unlink(neighbour)


@dataclass(frozen=True, kw_only=True)
class RequestReplay:
    """The sequence through the allocator model."""

    phases: dict[str, int]
    """Peak reserve at the end of each phase since the last ``empty_cache`` (``torch.cuda.max_memory_reserved()``
    as DeepSpeed's resets leave it), bytes."""
    peak_reserved_bytes: int
    """The peak reserve of the whole run, across the resets (what the validator measures); under a limit, where the
    run ran out of memory, the peak without the limit (what it asked for)."""
    retries: int = 0
    """Segments tried again under the limit after the cache was given back (``num_alloc_retries``)."""
    out_of_memory: bool = False
    """A request failed under the limit even with the cache given back: the run stops there."""


def replay(seq: Sequence, limit_bytes: int = 0, *, expandable: bool = False) -> RequestReplay:
    """A request sequence (``core.request_types.Sequence``) through the model: ``empty_cache`` gives segments back and
    restarts the peak, as DeepSpeed's runtime/utils.py ``empty_cache`` does. ``limit_bytes``: what the allocator may
    hold on the card (0: no limit); a run that passes it retries, and one that still cannot place a request runs out
    of memory, its peak then the one it asks for without the limit. ``expandable``: the allocator maps expandable
    segments (``TrainingSetup.expandable_segments``)."""
    model, blocks, phases = CachingAllocatorModel(limit=limit_bytes, expandable=expandable), {}, {}
    for op in seq.ops:
        if op[0] == "a":
            try:
                blocks[op[1]] = model.malloc(op[2], op[3] if len(op) > 3 else 0)
            except OutOfMemory:
                demand = replay(seq, expandable=expandable).peak_reserved_bytes
                return RequestReplay(phases=phases, peak_reserved_bytes=demand, retries=model.retries,
                                     out_of_memory=True)
        elif op[0] == "f":
            model.free(blocks.pop(op[1]))
        elif op[0] == "empty":
            model.empty_cache()
            model.reset_peak()
        else:
            phases[op[1]] = model.peak_reserved
    return RequestReplay(phases=phases, peak_reserved_bytes=model.run_peak_reserved, retries=model.retries)

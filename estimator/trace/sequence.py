"""A full-depth event sequence from a trace of the model cut to ``CUT_LAYERS`` decoder layers.

``trace.recorder.run_trace`` costs time in proportion to depth, nearly all of it in the decoder layers, which repeat.
``expand`` rebuilds the trace that the same model at ``total_layers`` layers would record from a trace of it at
``CUT_LAYERS`` layers, event by event: the same allocations (sizes) and frees in the same order, serials numbered in
allocation order as the recorder numbers them, every mark, ``saved``, ``logits``, ``grad_logits`` and ``excluded``.
Its check is tests/test_trace_sequence.py: the expanded trace equals a direct trace at 7 and 12 layers. For
qwen2.5-7b (28 layers, bf16, micro-batch 1, sequence 2048, on meta, torch 2.13 CPU build, transformers 5.24) the cut
is built, traced and expanded in 0.3-1.4 s against 1.8-7.8 s to build and trace the full depth (two runs; full or
LoRA r16, with or without checkpointing; about a sixth of the time, the expansion itself 0.02-0.04 s), and the two
traces are equal.

The cut trace is split at the layer marks into segments: the prologue (embeddings, rotary cos/sin, a mask if any), one
forward segment per layer (``layer{t}_fwd_start`` up to the next layer's start, so that it holds the free of the
layer's input after it returns), the head (``layer{last}_fwd_end`` to ``layer{last}_bwd_start``: norm, lm_head, loss,
their backward), one backward segment per layer (its ``bwd_start`` to the next one's) and the epilogue
(``layer0_bwd_end`` on: the parameter gradients dropped after the step). A storage made in a layer's segment is
named by (phase, layer, k-th allocation of that segment); a free in layer t's segment of a storage made in layer t'
is a free at offset ``t' - t`` (a layer's input is the previous layer's output; under checkpointing that input is
kept until the layer's backward; the gradient a layer's backward receives was made by the layer above). The full
sequence puts layer j's segments at j, taken from a cut layer: 0 for the first, 1 for the second, 2 for the
second-to-last, 3 for the last, and for every layer between them from cut layer 1, which must then match cut layer
2 event for event once offsets replace layer numbers: that is the check that the layers repeat. The head and the
epilogue are copied, with the storages of cut layers 0 and 1 mapped to layers 0 and 1 and of cut layers 2 and 3 to
the last two; where the epilogue runs over every layer (the parameter gradients, in parameter order), the run of
cut layer 1 is repeated for each layer between. Storages made in the prologue, head and epilogue keep their place.

Why four layers: the first and the last layer differ from the others. The first one's input, the embeddings'
output, stays alive until the head (the model's forward holds it), where without checkpointing every later layer
frees its input right after it returns; under LoRA without checkpointing that input needs no gradient, so the first
layer's backward computes none. The last layer's output goes to the final norm and its gradient comes from the head.
A middle layer's segments refer to both neighbours; with three cut layers the one middle layer's neighbours are the
first and the last, so what a middle layer does to a middle neighbour would be guessed from layers that differ. With
four, cut layer 1 shows it for the layer above and cut layer 2 for the layer below, and checking that the two agree
is what lets every layer between repeat them.

Only models whose decoder layers are all of one kind are in scope (llama, qwen2, mistral-like). A model whose layers
differ (gemma's sliding and global layers, MoE models with dense first layers, layers frozen apart) is refused:
``expand`` raises ValueError when the cut trace's layers 1 and 2 differ, and when ``kinds`` (``trace.kinds.layout``
of the full-depth model) says that the real layers are not all of one kind, which the four cut layers may not show
(gemma3's global layer comes every sixth).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from zeroest.estimator.trace.polys import Trace

CUT_LAYERS = 4
"""Decoder layers of the traced cut (see the module docstring for why four)."""
_LAYER_MARK = re.compile(r"layer(\d+)_((fwd|bwd)_\w+)")
_LAYER_REGION = re.compile(r"layer(\d+)")


@dataclass(frozen=True)
class _Segment:
    """Events ``start`` to ``end`` of the cut trace: ``kind`` "pro", "fwd", "head", "bwd" or "epi"; ``layer`` for
    the layers' segments."""

    kind: str
    layer: int | None
    start: int
    end: int


@dataclass
class _Cut:
    """The cut trace taken apart: its segments, where each layer storage was made, and each segment's marks."""

    trace: Trace
    layers: int
    total_layers: int
    segments: list[_Segment]
    owners: dict[int, tuple[_Segment, int]]
    """Serial -> (segment, k) for a storage made in a layer's segment, its k-th allocation."""
    marks: dict[_Segment, dict[int, list[str]]]
    """Segment -> offset in it -> the marks set there (an offset may be the segment's length: after its events)."""

    def owner(self, event: int) -> tuple[_Segment, int] | None:
        """Where the storage of an allocation or free event was made, if in a layer's segment."""
        return self.owners.get(event if event >= 0 else ~event)

    def absolute(self, cut_layer: int) -> int:
        """A cut layer seen from the prologue, head or epilogue: layers 0 and 1 from the bottom, 2 and 3 from the
        top."""
        return cut_layer if cut_layer < 2 else cut_layer + self.total_layers - self.layers

    def template(self, full_layer: int) -> int:
        """The cut layer whose segments stand for full layer ``full_layer``: the first two and the last two are
        themselves, every layer between is cut layer 1."""
        if full_layer < 2:
            return full_layer
        if full_layer >= self.total_layers - 2:
            return full_layer - self.total_layers + self.layers
        return 1


def _segments(trace: Trace, layers: int) -> list[_Segment]:
    """The cut trace split at the layer marks, in order (see the module docstring)."""
    marks, last = trace.marks, layers - 1
    needed = [f"layer{t}_{m}" for t in range(layers) for m in ("fwd_start", "fwd_end", "bwd_start", "bwd_end")]
    missing = [name for name in needed if name not in marks]
    if missing:
        raise ValueError(f"the trace lacks the marks {missing}: is it a trace of {layers} decoder layers?")
    cuts = [("pro", None, 0)]
    cuts += [("fwd", t, marks[f"layer{t}_fwd_start"]) for t in range(layers)]
    cuts += [("head", None, marks[f"layer{last}_fwd_end"])]
    cuts += [("bwd", t, marks[f"layer{t}_bwd_start"]) for t in reversed(range(layers))]
    cuts += [("epi", None, marks["layer0_bwd_end"]), ("end", None, len(trace.events))]
    starts = [at for _, _, at in cuts]
    if starts != sorted(starts):
        raise ValueError("the trace's layer marks are out of order (a layer without a backward, say): only layers "
                         "that all train alike can be expanded")
    return [_Segment(kind, layer, at, cuts[i + 1][2]) for i, (kind, layer, at) in enumerate(cuts[:-1])]


def _take_apart(trace: Trace, layers: int, total_layers: int) -> _Cut:
    """Segments, owners and marks of the cut trace. A layer's mark goes to that layer's segment of its phase
    where it sits at the segment's edge (``layer0_fwd_end`` ends layer 0's forward segment even when layer 1's
    starts at the same event), any other mark to the segment holding its event (the last, at the end)."""
    segments = _segments(trace, layers)
    owners: dict[int, tuple[_Segment, int]] = {}
    for seg in segments:
        if seg.layer is not None:
            made = [e for e in trace.events[seg.start:seg.end] if e >= 0]
            owners.update((serial, (seg, k)) for k, serial in enumerate(made))
    marks: dict[_Segment, dict[int, list[str]]] = {seg: {} for seg in segments}
    for name, at in sorted(trace.marks.items(), key=lambda item: item[1]):  # in recorded order at one event
        found = _LAYER_MARK.fullmatch(name)
        own = [s for s in segments if found and s.kind == found[3] and s.layer == int(found[1])
               and s.start <= at <= s.end]
        own = own or [s for s in segments if s.start <= at < s.end] or [segments[-1]]
        marks[own[0]].setdefault(at - own[0].start, []).append(name)
    return _Cut(trace, layers, total_layers, segments, owners, marks)


def _relative(cut: _Cut, seg: _Segment) -> list[tuple]:
    """Layer segment ``seg`` with layer numbers made offsets from its own: what must repeat."""
    trace, out = cut.trace, []
    for at in range(seg.start, seg.end + 1):
        for name in cut.marks[seg].get(at - seg.start, ()):
            found = _LAYER_MARK.fullmatch(name)
            out.append(("mark", int(found[1]) - seg.layer, found[2]) if found else ("mark", name))
        if at == seg.end:
            break
        event, owner = trace.events[at], cut.owner(trace.events[at])
        if event >= 0:
            out.append(("alloc", trace.sizes[event], event in trace.excluded,
                        _region_offset(trace.saved.get(event), seg.layer)))
        elif owner is not None:
            out.append(("free", owner[0].kind, owner[0].layer - seg.layer, owner[1]))
        else:
            out.append(("free", ~event))
    return out


def _region_offset(region: str | None, layer: int):
    """A layer region ("layer5") as ("layer", offset from ``layer``); others as they are."""
    found = _LAYER_REGION.fullmatch(region) if region else None
    return ("layer", int(found[1]) - layer) if found else region


class _Builder:
    """The full sequence as it is built: storages named by address, numbered in allocation order as the recorder
    numbers them."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self.serial_of: dict[tuple, int] = {}
        self.live: set[int] = set()
        self.sizes: list[int] = []
        self.events: list[int] = []
        self.marks: dict[str, int] = {}
        self.saved: dict[int, str] = {}
        self.excluded: set[int] = set()

    def mark(self, name: str) -> None:
        """Set mark ``name`` before the next event."""
        if name in self.marks:
            raise ValueError(f"the expanded trace would set the mark {name} twice: the layers do not repeat")
        self.marks[name] = len(self.events)

    def alloc(self, address: tuple, cut_serial: int, region: str | None) -> None:
        serial = len(self.sizes)
        self.serial_of[address] = serial
        self.live.add(serial)
        self.sizes.append(self.trace.sizes[cut_serial])
        self.events.append(serial)
        if region is not None:
            self.saved[serial] = region
        if cut_serial in self.trace.excluded:
            self.excluded.add(serial)

    def free(self, address: tuple) -> None:
        serial = self.serial_of.get(address)
        if serial not in self.live:
            raise ValueError(f"the expanded trace would free {address}, which is not alive: the layers do not "
                             "repeat")
        self.live.discard(serial)
        self.events.append(~serial)


def _copy_layer(out: _Builder, cut: _Cut, seg: _Segment, full: int) -> None:
    """Layer segment ``seg`` of the cut trace as full layer ``full``'s: layer numbers moved by ``full - seg.layer``."""
    trace, shift = cut.trace, full - seg.layer
    for at in range(seg.start, seg.end + 1):
        for name in cut.marks[seg].get(at - seg.start, ()):
            found = _LAYER_MARK.fullmatch(name)
            out.mark(f"layer{int(found[1]) + shift}_{found[2]}" if found else name)
        if at == seg.end:
            break
        event, owner = trace.events[at], cut.owner(trace.events[at])
        if event >= 0:
            region = _region_offset(trace.saved.get(event), seg.layer)
            out.alloc((seg.kind, full, owner[1]), event,
                      f"layer{full + region[1]}" if isinstance(region, tuple) else region)
        elif owner is not None:
            out.free((owner[0].kind, owner[0].layer + shift, owner[1]))
        else:
            out.free(("edge", ~event))


def _middle_runs(cut: _Cut, events: list[int]) -> tuple[int, int, int] | None:
    """Where an edge segment runs over the layers (the parameter gradients dropped in parameter order): the
    starts of its runs over cut layer 1's and cut layer 2's storages and their length; None unless it holds
    both. The two runs must be adjacent and alike."""
    owners = [cut.owner(e) for e in events]
    runs = {t: [i for i, o in enumerate(owners) if o is not None and o[0].layer == t] for t in (1, 2)}
    if not runs[1] or not runs[2]:
        return None
    one, two, length = runs[1][0], runs[2][0], len(runs[1])

    def shape(start: int) -> list[tuple]:
        return [(events[i] >= 0, owners[i][0].kind, owners[i][1]) for i in range(start, start + length)]

    alike = runs[1] == list(range(one, one + length)) and runs[2] == list(range(two, two + length))
    if not alike or abs(one - two) != length or shape(one) != shape(two):
        raise ValueError("the trace's head or epilogue treats layers 1 and 2 differently: they do not repeat")
    return one, two, length


def _copy_edge(out: _Builder, cut: _Cut, seg: _Segment) -> None:
    """The prologue, head or epilogue of the cut trace with the layers it refers to mapped to full depth
    (``_Cut.absolute``); a run over layers 1 and 2 gains one copy of layer 1's part per layer between them."""
    trace = cut.trace

    def emit(event: int, layer_of) -> None:
        owner = cut.owner(event)
        if event >= 0:
            region = _region_offset(trace.saved.get(event), 0)
            out.alloc(("edge", event), event,
                      f"layer{cut.absolute(region[1])}" if isinstance(region, tuple) else region)
        elif owner is not None:
            out.free((owner[0].kind, layer_of(owner[0].layer), owner[1]))
        else:
            out.free(("edge", ~event))

    events = trace.events[seg.start:seg.end]
    runs = _middle_runs(cut, events)
    for offset in range(len(events) + 1):
        for name in cut.marks[seg].get(offset, ()):
            found = _LAYER_MARK.fullmatch(name)
            out.mark(f"layer{cut.absolute(int(found[1]))}_{found[2]}" if found else name)
        if offset == len(events):
            break
        if runs is not None and offset == max(runs[:2]):
            one, two, length = runs
            between = range(2, cut.total_layers - 2)
            for full in between if one < two else reversed(between):
                for event in events[min(one, two):min(one, two) + length]:
                    emit(event, lambda _layer, full=full: full)
        emit(events[offset], cut.absolute)


def expand(trace: Trace, layers: int, total_layers: int, *, kinds: list[int] | None = None) -> Trace:
    """The trace of the model at ``total_layers`` decoder layers, from ``trace`` of it at ``layers`` (see the
    module docstring for how, and why ``layers`` must be ``CUT_LAYERS``).

    ``kinds``: the kind of each real layer (``trace.kinds.layout(model)["kinds"]`` of the full-depth model), when
    known; layers of more than one kind are refused. Raises ValueError for a trace whose layers do not repeat.
    """
    if layers != CUT_LAYERS:
        raise ValueError(f"expand needs a trace of {CUT_LAYERS} decoder layers, not {layers}: the first, the last "
                         "and two middle layers whose agreement shows that the layers repeat")
    if total_layers < layers:
        raise ValueError(f"total_layers ({total_layers}) is below the traced {layers}: trace that depth directly")
    if kinds is not None and len(set(kinds)) > 1:
        other = [i for i, k in enumerate(kinds) if k != kinds[0]]
        raise ValueError(f"the model's decoder layers are of {len(set(kinds))} kinds (layers {other[:8]} differ "
                         "from layer 0: sliding and global attention, dense and MoE MLPs, or frozen layers): only "
                         "models whose layers are all alike can be expanded")
    cut = _take_apart(trace, layers, total_layers)
    by_layer = {(s.kind, s.layer): s for s in cut.segments if s.layer is not None}
    for phase, name in (("fwd", "forward"), ("bwd", "backward")):
        if _relative(cut, by_layer[(phase, 1)]) != _relative(cut, by_layer[(phase, 2)]):
            raise ValueError(f"layers 1 and 2 of the trace record different {name} events: the model's layers are "
                             "not all of one kind (sliding and global attention, dense and MoE MLPs, layers frozen "
                             "apart), and cannot be expanded")
    edges = {s.kind: s for s in cut.segments if s.layer is None}
    out = _Builder(trace)
    _copy_edge(out, cut, edges["pro"])
    for full in range(total_layers):
        _copy_layer(out, cut, by_layer[("fwd", cut.template(full))], full)
    _copy_edge(out, cut, edges["head"])
    for full in reversed(range(total_layers)):
        _copy_layer(out, cut, by_layer[("bwd", cut.template(full))], full)
    _copy_edge(out, cut, edges["epi"])
    return Trace(sizes=out.sizes, events=out.events, marks=out.marks, saved=out.saved,
                 logits=out.serial_of.get(("edge", trace.logits)),
                 grad_logits=out.serial_of.get(("edge", trace.grad_logits)), excluded=out.excluded)

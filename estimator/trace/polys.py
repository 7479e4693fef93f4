"""Traced storages as polynomials in (micro_batch, seq_len), and the profile they give at any shape.

A trace of the HF model (``trace.recorder``) sees every tensor storage the step creates. Each storage's size is
a monomial ``c * b**i * s**j`` in the micro-batch b and the sequence length s: ``i, j`` are found by tracing
three shapes, (b0, s0), (2 b0, s0) and (b0, 2 s0), and comparing each storage's bytes across them (the op
sequence is the same, so the n-th storage of one trace is the n-th of the others). A set of storages is then a
polynomial: a dict ``{(i, j): c}``; the saved sets and live-byte peaks of one trace become polynomials that
give the profile at any (b, s) without tracing again: linear in b*s for most terms, quadratic in s for eager
attention probabilities, linear in s alone for rotary cos/sin tables shared by the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from zeroest.estimator.core.profile import ActivationProfile

Poly = dict[tuple[int, int], float]
"""Bytes as a polynomial in (b, s): ``{(i, j): c}`` means ``sum(c * b**i * s**j)``."""


def fit_terms(base: list[int], twice_b: list[int], twice_s: list[int], b0: int, s0: int) -> list[Poly]:
    """One monomial per storage from its bytes at (b0, s0), (2 b0, s0) and (b0, 2 s0).

    Bytes doubling with b give exponent 1 in b; doubling or quadrupling with s give 1 or 2 in s. A size that
    does not scale by a power of two (``b * (s + 1)`` labels padded by one) is rounded to the nearest
    monomial; its error is the size of one row of the tensor.
    """
    terms: list[Poly] = []
    for n1, n2, n3 in zip(base, twice_b, twice_s, strict=True):
        if n1 == 0:
            terms.append({})
            continue
        i = max(0, min(2, round(math.log2(max(n2, 1) / n1))))
        j = max(0, min(3, round(math.log2(max(n3, 1) / n1))))
        terms.append({(i, j): n1 / (b0**i * s0**j)})
    return terms


def add(acc: Poly, term: Poly, sign: int = 1) -> None:
    """``acc += sign * term`` in place."""
    for key, c in term.items():
        acc[key] = acc.get(key, 0.0) + sign * c


def total(terms: list[Poly], serials) -> Poly:
    """Sum of the storages' polynomials."""
    acc: Poly = {}
    for serial in serials:
        add(acc, terms[serial])
    return acc


def dominated(p: Poly, q: Poly) -> bool:
    """True when p <= q for every b, s >= 1 (coefficient by coefficient, all coefficients >= 0)."""
    return all(c <= q.get(k, 0.0) + 1e-9 for k, c in p.items())


def keep_maximal(candidates: list[Poly], new: Poly) -> None:
    """Add ``new`` to a list of peak candidates unless another one dominates it; drop those it dominates."""
    if any(dominated(new, c) for c in candidates):
        return
    candidates[:] = [c for c in candidates if not dominated(c, new)]
    candidates.append(dict(new))


def evaluate(p: Poly, b: int, s: int) -> int:
    """The polynomial's bytes at micro-batch b and sequence length s."""
    return round(sum(c * b**i * s**j for (i, j), c in p.items()))


def peak(candidates: list[Poly], b: int, s: int) -> int:
    """The largest candidate at (b, s): the peak of a phase whose live set is known at each local top."""
    return max((evaluate(c, b, s) for c in candidates), default=0)


@dataclass
class Trace:
    """What one forward+backward recorded: storage sizes and events, marks, saved and special storages."""

    sizes: list[int]
    events: list[int]
    marks: dict[str, int]
    saved: dict[int, str]
    """Serial -> region that first saved (or, under checkpointing, first kept) it."""
    logits: int
    grad_logits: int | None
    excluded: set[int] = field(default_factory=set)
    """Parameter-gradient storages."""


def _windows(layers: int) -> dict[str, tuple[str, str]]:
    """Mark pairs that open and close each peak window of a copy of ``layers`` decoder layers: each layer's
    forward and backward, and the head's (up to the backward of the last layer)."""
    last = layers - 1
    windows = {"head_fwd": (f"layer{last}_fwd_end", "fwd_end"),
               "head_bwd": ("bwd_start", f"layer{last}_bwd_start"),
               "head_bwd_late": ("first_grad", f"layer{last}_bwd_start")}
    for t in range(layers):
        windows[f"layer{t}_fwd"] = (f"layer{t}_fwd_start", f"layer{t}_fwd_end")
        windows[f"layer{t}_bwd"] = (f"layer{t}_bwd_start", f"layer{t}_bwd_end")
    return windows


def _alive_at(events: list[int], index: int) -> set[int]:
    """Storages allocated and not yet freed before event ``index``."""
    alive: set[int] = set()
    for event in events[:index]:
        if event >= 0:
            alive.add(event)
        else:
            alive.discard(~event)
    return alive


def analyze(trace: Trace, terms: list[Poly]) -> dict:
    """Polynomials of one traced mode: saved sets per region, special tensors, and live peaks per window.

    A region counts the storages its modules saved (or, under checkpointing, kept as layer inputs) that are
    still alive at the end of forward: a storage saved for a node that died with a discarded branch of the
    graph (a MoE router's scores that reach no output, say) is freed before backward and keeps nothing.
    """

    def term(serial: int | None) -> Poly:
        return {} if serial is None or serial in trace.excluded else terms[serial]

    layers = sum(1 for name in trace.marks if name.endswith("_fwd_start") and name.startswith("layer"))
    windows = _windows(layers)
    snapshot_marks = {"fwd_end": "fwd_end", f"layer{layers - 1}_bwd_end": "after_layers"}
    kept = _alive_at(trace.events, trace.marks.get("fwd_end", len(trace.events)))
    regions = {
        r: total(terms, [s for s, w in trace.saved.items() if w == r and s in kept and s not in trace.excluded])
        for r in ("embed", *(f"layer{t}" for t in range(layers)), "head", "loss")
    }
    by_index: dict[int, list[str]] = {}
    for name, at in trace.marks.items():
        by_index.setdefault(at, []).append(name)
    live: Poly = {}
    snapshots: dict[str, Poly] = {}
    peaks: dict[str, list[Poly]] = {w: [] for w in windows}
    open_windows: set[str] = set()
    events = trace.events
    for index in range(len(events) + 1):
        for name in by_index.get(index, ()):
            for window, (start, end) in windows.items():
                if name in (start, end):
                    keep_maximal(peaks[window], live)
                    (open_windows.add if name == start else open_windows.discard)(window)
            if name in snapshot_marks:
                snapshots[snapshot_marks[name]] = dict(live)
        if index == len(events):
            break
        event = events[index]
        if event >= 0:
            add(live, term(event))
            following = events[index + 1] if index + 1 < len(events) else -1
            if following < 0 or index + 1 in by_index:
                for window in open_windows:
                    keep_maximal(peaks[window], live)
        else:
            add(live, term(~event), -1)
    missing = [n for pair in windows.values() for n in pair if n not in trace.marks] + [
        n for n, key in snapshot_marks.items() if key not in snapshots
    ]
    if missing or not layers:
        raise RuntimeError(f"trace lacks the marks {sorted(set(missing))}: the model's layers were not seen")
    return {
        "regions": regions,
        "logits": term(trace.logits),
        "grad_logits": term(trace.grad_logits),
        "snapshots": snapshots,
        "peaks": peaks,
    }


def _mode_bytes(mode: dict, plan: dict, b: int, s: int) -> dict:
    """One traced mode evaluated at (b, s) and laid out over the real layers (``trace.kinds``): the embeddings
    with each kind's first-layer extra, every kind's steady bytes, the real layers' total, and per kind the
    forward and backward peaks of its steady copy layer over the copy's stack through it, less what the real
    layers above the deepest layer of that kind keep (their bytes are not live yet, or freed already; a layer
    that is the first of its kind keeps its first copy's bytes)."""

    def ev(poly: Poly) -> int:
        return evaluate(poly, b, s)

    r = mode["regions"]
    copy = [ev(r[f"layer{t}"]) for t in range(len(plan["picks"]))]
    embed = ev(r["embed"])
    steady = [copy[t] for t in plan["steady"]]
    through = [embed + sum(copy[: t + 1]) for t in range(len(copy))]
    kinds = plan["kinds"]
    real = [copy[plan["first"][k]] if k not in kinds[:i] else steady[k] for i, k in enumerate(kinds)]
    above = []
    for kind in range(len(steady)):
        deepest = max(i for i, k in enumerate(kinds) if k == kind)
        above.append(sum(real[deepest + 1:]))
    return {
        "embedding": embed + sum(copy[f] - copy[t] for f, t in zip(plan["first"], plan["steady"], strict=True)),
        "deepest": steady[kinds[-1]],
        "layers": sum(steady[k] for k in kinds),
        "stack": through[-1],
        "below_last": through[-1] - copy[-1],
        "fwd_end": ev(mode["snapshots"]["fwd_end"]),
        "after_layer": ev(mode["snapshots"]["after_layers"]),
        "layer_fwd": [peak(mode["peaks"][f"layer{t}_fwd"], b, s) - through[t] - a
                      for t, a in zip(plan["steady"], above, strict=True)],
        "layer_bwd": [peak(mode["peaks"][f"layer{t}_bwd"], b, s) - through[t] - a
                      for t, a in zip(plan["steady"], above, strict=True)],
        **{w: peak(mode["peaks"][w], b, s) for w in ("head_fwd", "head_bwd", "head_bwd_late")},
    }


def profile_from_polys(entry: dict, micro_batch: int, seq_len: int) -> ActivationProfile:
    """Evaluate a traced entry at (micro_batch, seq_len) for the real model its ``layout`` describes.

    The layers' fields are per kind (``trace.kinds``): ``layer_saved_bytes`` is the deepest layer's kind
    (its backward runs first, and is recomputed first under checkpointing), ``all_layers_saved_bytes`` sums
    every real layer's kind; each transient is the largest over the kinds once the layers above each kind's
    deepest layer are taken off the stack (``_mode_bytes``), so that ``stack + transient`` is that layer's
    peak. With one kind of layer this is the 2-layer steady state of before: layer 1 times the depth.
    """
    b, s = micro_batch, seq_len
    plan = entry["layout"]
    plain, ckpt = entry["plain"], entry["ckpt"]
    p, c = _mode_bytes(plain, plan, b, s), _mode_bytes(ckpt, plan, b, s)
    logits, grad_logits = evaluate(plain["logits"], b, s), evaluate(plain["grad_logits"], b, s)
    head = p["fwd_end"] - p["stack"] - logits
    recompute = p["deepest"]
    ckpt_bwd = max(c["layer_bwd"]) - recompute  # the peak over the checkpointed stack, less the recompute
    return ActivationProfile(
        embedding_saved_bytes=p["embedding"],
        ckpt_embedding_saved_bytes=c["embedding"],
        layer_saved_bytes=p["deepest"],
        ckpt_layer_saved_bytes=c["deepest"],
        all_layers_saved_bytes=p["layers"],
        ckpt_all_layers_saved_bytes=c["layers"],
        head_saved_bytes=head,
        logits_bytes=logits,
        loss_transient_bytes=max(0, p["head_fwd"] - p["fwd_end"]),
        layer_forward_transient_bytes=max(0, *p["layer_fwd"]),
        ckpt_layer_forward_transient_bytes=max(0, *c["layer_fwd"]),
        grad_logits_bytes=grad_logits,
        backward_head_transient_bytes=max(0, p["head_bwd"] - p["stack"] - head - grad_logits),
        head_after_grad_bytes=max(0, p["head_bwd_late"] - p["stack"]),
        ckpt_head_after_grad_bytes=max(0, c["head_bwd_late"] - c["stack"]),
        grad_hidden_bytes=max(0, p["after_layer"] - p["below_last"]),
        layer_backward_transient_bytes=max(0, *p["layer_bwd"]),
        ckpt_layer_backward_transient_bytes=max(0, ckpt_bwd),
    )

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


_WINDOWS = {
    "layer_fwd": ("layer1_fwd_start", "layer1_fwd_end"),
    "head_fwd": ("layer1_fwd_end", "fwd_end"),
    "head_bwd": ("bwd_start", "layer1_bwd_start"),
    "head_bwd_late": ("first_grad", "layer1_bwd_start"),
    "layer_bwd": ("layer1_bwd_start", "layer1_bwd_end"),
}
_SNAPSHOTS = ("fwd_end", "layer1_bwd_end")


def analyze(trace: Trace, terms: list[Poly]) -> dict:
    """Polynomials of one traced mode: saved sets per region, special tensors, and live peaks per window."""

    def term(serial: int | None) -> Poly:
        return {} if serial is None or serial in trace.excluded else terms[serial]

    regions = {
        r: total(terms, [s for s, w in trace.saved.items() if w == r and s not in trace.excluded])
        for r in ("embed", "layer0", "layer1", "head", "loss")
    }
    by_index: dict[int, list[str]] = {}
    for name, at in trace.marks.items():
        by_index.setdefault(at, []).append(name)
    live: Poly = {}
    snapshots: dict[str, Poly] = {}
    peaks: dict[str, list[Poly]] = {w: [] for w in _WINDOWS}
    open_windows: set[str] = set()
    events = trace.events
    for index in range(len(events) + 1):
        for name in by_index.get(index, ()):
            for window, (start, end) in _WINDOWS.items():
                if name in (start, end):
                    keep_maximal(peaks[window], live)
                    (open_windows.add if name == start else open_windows.discard)(window)
            if name in _SNAPSHOTS:
                snapshots[name] = dict(live)
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
    missing = [n for pair in _WINDOWS.values() for n in pair if n not in trace.marks] + [
        n for n in _SNAPSHOTS if n not in snapshots
    ]
    if missing:
        raise RuntimeError(f"trace lacks the marks {sorted(set(missing))}: the model's layers were not seen")
    return {
        "regions": regions,
        "logits": term(trace.logits),
        "grad_logits": term(trace.grad_logits),
        "snapshots": snapshots,
        "peaks": peaks,
    }


def profile_from_polys(entry: dict, micro_batch: int, seq_len: int, num_layers: int) -> ActivationProfile:
    """Evaluate a traced entry at (micro_batch, seq_len) for a model of ``num_layers`` equal layers."""
    b, s = micro_batch, seq_len

    def ev(poly: Poly) -> int:
        return evaluate(poly, b, s)

    def split(mode: dict) -> dict:
        r = mode["regions"]
        e, l0, l1 = ev(r["embed"]), ev(r["layer0"]), ev(r["layer1"])
        return {
            "embedding": e + l0 - l1,
            "layer": l1,
            "stack2": e + l0 + l1,
            "e_l0": e + l0,
            "fwd_end": ev(mode["snapshots"]["fwd_end"]),
            "after_layer": ev(mode["snapshots"]["layer1_bwd_end"]),
            **{w: peak(c, b, s) for w, c in mode["peaks"].items()},
        }

    plain, ckpt = entry["plain"], entry["ckpt"]
    p, c = split(plain), split(ckpt)
    logits, grad_logits = ev(plain["logits"]), ev(plain["grad_logits"])
    head = p["fwd_end"] - p["stack2"] - logits
    return ActivationProfile(
        embedding_saved_bytes=p["embedding"],
        ckpt_embedding_saved_bytes=c["embedding"],
        layer_saved_bytes=p["layer"],
        ckpt_layer_saved_bytes=c["layer"],
        all_layers_saved_bytes=num_layers * p["layer"],
        ckpt_all_layers_saved_bytes=num_layers * c["layer"],
        head_saved_bytes=head,
        logits_bytes=logits,
        loss_transient_bytes=max(0, p["head_fwd"] - p["fwd_end"]),
        layer_forward_transient_bytes=max(0, p["layer_fwd"] - p["stack2"]),
        ckpt_layer_forward_transient_bytes=max(0, c["layer_fwd"] - c["stack2"]),
        grad_logits_bytes=grad_logits,
        backward_head_transient_bytes=max(0, p["head_bwd"] - p["stack2"] - head - grad_logits),
        head_after_grad_bytes=max(0, p["head_bwd_late"] - p["stack2"]),
        ckpt_head_after_grad_bytes=max(0, c["head_bwd_late"] - c["stack2"]),
        grad_hidden_bytes=max(0, p["after_layer"] - p["e_l0"]),
        layer_backward_transient_bytes=max(0, p["layer_bwd"] - p["stack2"]),
        ckpt_layer_backward_transient_bytes=max(0, c["layer_bwd"] - c["stack2"] - p["layer"]),
    )

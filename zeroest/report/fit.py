"""Fit the named overheads of ``Overheads`` to measured runs, and cross-validate the fit grouped by model.

Only declared parameters are fitted, each against the measured quantity it shapes (``FITTED_FOR``):

* peak allocated <- ``cublas_workspace_bytes``, ``activation_scale``;
* peak reserved <- the coefficients of ``estimator.core.reserved`` (``RESERVED_PARAMETERS``);
* device (nvidia-smi) <- ``cuda_context_bytes``, ``nccl_bytes_per_peer``.

The three are fitted in that order, each by ``scipy.optimize.least_squares`` on relative errors ``(predicted -
measured) / measured`` with the earlier ones held, because reserved memory is built on the predicted peak and
device memory on the predicted reserved (``estimator.estimate.reserved_bytes`` and ``estimate``). A weak prior
(``PRIOR_WEIGHT`` per GiB or per unit of a fraction) pulls parameters the data cannot tell apart back to the
start values instead of letting them wander.

The reserved coefficients are those of the fitted terms (``core.reserved``), which give the reserve where no request
sequence is built; they are fitted on every row as those terms predict it, also on rows whose reserve the request
sequence sets (``ReservedFacts.sequence_reserved_bytes``, left out of the fit's samples), since the same allocator
made them: on the sequence alone those rows would say nothing of the coefficients, and the folds of the other rows
alone leave them loose (on the H100 rows, one held-out stage-3 row went from 27% to 45%).

The fit does not call ``estimate()`` in its inner loop: ``Sample`` keeps, per phase, the bytes an estimate
made with ``NEUTRAL`` overheads holds apart from activations and the cuBLAS workspace, and ``predict_sample``
applies the overheads exactly as ``estimator.estimate.estimate`` does (tests/test_report_fit.py checks the two
agree). Pure: no torch, no I/O; scipy is imported inside ``fit_overheads``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from zeroest.estimator.core.overheads import Overheads, device_from
from zeroest.estimator.core.reserved import NO_BLOCKS, ReservedFacts, reserved_terms
from zeroest.estimator.units import GiB

QUANTITIES: tuple[str, ...] = ("peak_allocated", "peak_reserved", "device")
RESERVED_PARAMETERS: tuple[str, ...] = (
    "reserved_fraction_of_activations", "reserved_reuse_fraction", "reserved_fraction_of_offload_grads",
    "reserved_fraction_of_gathered", "reserved_fraction_of_logits", "reserved_fraction_of_peak",
    "reserved_fraction_expandable",
)
"""The coefficients of ``estimator.core.reserved`` the fit sets (f_a, r, f_o, f_g, f_L, f_p, f_x). The constant c
(``reserved_fixed_bytes``) stays at its default: free, it took up to 1.6 GiB in folds that held out the small
models, where a constant is what a relative error cannot pin down."""
RESERVED_NEEDS = {
    "reserved_reuse_fraction": lambda f: f.contiguous_step and f.contiguous_block_bytes <= f.largest_free_block_bytes,
    "reserved_fraction_of_offload_grads": lambda f: f.offload_grad_bytes > 0,
    "reserved_fraction_of_gathered": lambda f: f.gathered_bytes > 0,
    "reserved_fraction_of_logits": lambda f: f.logits_block_bytes > 0,
    "reserved_fraction_expandable": lambda f: f.expandable_segments,
}
"""What a row must have for a reserved coefficient to act on it (``core.reserved.ReservedFacts``)."""
RESERVED_NEEDS_TEXT = {
    "reserved_reuse_fraction": "a flat step buffer that fits a freed block",
    "reserved_fraction_of_offload_grads": "optimizer offload",
    "reserved_fraction_of_gathered": "stage-3 gathered parameters",
    "reserved_fraction_of_logits": "a loss over logits",
    "reserved_fraction_expandable": "expandable segments",
}
FITTED_FOR: dict[str, tuple[str, ...]] = {
    "peak_allocated": ("cublas_workspace_bytes", "activation_scale"),
    "peak_reserved": RESERVED_PARAMETERS,
    "device": ("cuda_context_bytes", "nccl_communicator_bytes", "nccl_bytes_per_peer"),
}
BOUNDS: dict[str, tuple[float, float]] = {
    "cublas_workspace_bytes": (0.0, 4.0 * GiB),
    "activation_scale": (0.25, 4.0),
    "reserved_fraction_of_peak": (0.0, 2.0),
    "reserved_fraction_of_activations": (0.0, 4.0),
    "reserved_reuse_fraction": (0.0, 1.0),
    "reserved_fraction_of_offload_grads": (0.0, 4.0),
    "reserved_fraction_of_gathered": (0.0, 4.0),
    "reserved_fraction_of_logits": (0.0, 4.0),
    "reserved_fraction_expandable": (0.0, 1.0),
    "nccl_communicator_bytes": (0.0, 8.0 * GiB),
    "reserved_fixed_bytes": (0.0, 16.0 * GiB),
    "cuda_context_bytes": (0.0, 16.0 * GiB),
    "nccl_bytes_per_peer": (0.0, 4.0 * GiB),
}
"""Physical ranges: no overhead is negative, none is larger than a GPU, and no more than the whole free cache is
reused."""
PRIOR_WEIGHT = 1e-3
"""Residual weight of a parameter's distance from its start (per GiB for bytes, per unit for fractions)."""
NEUTRAL = Overheads(cuda_context_bytes=0, cublas_workspace_bytes=0, nccl_bytes_per_peer=0, nccl_communicator_bytes=0,
                    reserved_fraction_of_peak=0.0, reserved_fraction_of_activations=0.0, reserved_reuse_fraction=0.0,
                    reserved_fraction_of_offload_grads=0.0, reserved_fraction_of_gathered=0.0, reserved_fixed_bytes=0,
                    reserved_fraction_of_logits=0.0, reserved_fraction_expandable=0.0, activation_scale=1.0,
                    source="neutral (fit basis)")
"""Overheads that add nothing: the estimates ``Sample`` is built from."""
BASIS_SCALES: tuple[float, ...] = (1.0, 0.25, 0.5, 2.0, 4.0)
"""``activation_scale`` values the basis estimates are made at (``NEUTRAL`` otherwise). A phase can choose
between candidate points by their totals (``estimator.timeline``: backward's peak is at its start, with the
activations, or at its end, with the gradients), so which point holds the peak depends on the scale; estimates
across ``BOUNDS["activation_scale"]`` reveal the candidates, and the peak is the largest of them all."""


@dataclass(frozen=True, kw_only=True)
class PhaseTerms:
    """One predicted phase split into what the overheads act on (bytes, from a ``NEUTRAL`` estimate)."""

    name: str
    """init, forward, backward or step (a phase may have several candidate points)."""
    other_bytes: int
    """Every component of the phase except activations (no cuBLAS workspace: it is 0 in ``NEUTRAL``)."""
    activation_bytes: int
    """Activations at the phase peak, unscaled (``activation_scale`` 1)."""
    temporaries_bytes: int
    """Temporaries at the phase peak."""
    components: dict[str, int] = field(default_factory=dict)
    """The phase's components with activations unscaled (what ``core.reserved`` reads)."""


@dataclass(frozen=True, kw_only=True)
class Sample:
    """One measured rank, ready for the fit."""

    key: str
    """Identifies the row (file:line) in reports."""
    group: str
    """The model: cross-validation never puts one group in both a training and a test fold."""
    phases: tuple[PhaseTerms, ...]
    """Candidate peak points of the predicted phases, in run order (``terms_from_estimates``)."""
    peers: int
    """Ranks this one talks to through real NCCL communicators: N_d - 1, or 0 on a fake process group."""
    real_comm: bool = True
    """The rank had a real NCCL process group (False on a fake one: simulated rows, CPU rows)."""
    measured: dict[str, int | None] = field(default_factory=dict)
    """Measured bytes by quantity (``QUANTITIES``); None where not measured."""
    facts: ReservedFacts | None = None
    """Block sizes of the reserved model (``Estimate.reserved_facts``); None: ``core.reserved.NO_BLOCKS``."""


def terms_from_phases(phases: dict[str, dict], activation_scale: float = 1.0) -> tuple[PhaseTerms, ...]:
    """``PhaseTerms`` from ``Estimate.to_dict()["phases"]`` of an estimate made with ``NEUTRAL`` overheads but
    ``activation_scale`` (activations are divided by it back to unscaled bytes)."""
    out = []
    for name, phase in phases.items():
        for comps in phase.get("candidates") or [phase["components"]]:  # every candidate point, where listed
            act = int(comps.get("activations", 0))
            unscaled = round(act / activation_scale)
            out.append(PhaseTerms(name=name, other_bytes=int(sum(comps.values())) - act, activation_bytes=unscaled,
                                  temporaries_bytes=int(comps.get("temporaries", 0)),
                                  components={**{k: int(v) for k, v in comps.items()}, "activations": unscaled}))
    return tuple(out)


def facts_from_estimate(est: dict) -> ReservedFacts | None:
    """``ReservedFacts`` from ``Estimate.to_dict()`` (None for an estimate without them: paper mode)."""
    facts = est.get("reserved_facts")
    return ReservedFacts(**facts) if facts else None


def terms_from_estimates(by_scale: dict[float, dict[str, dict]]) -> tuple[PhaseTerms, ...]:
    """Every distinct candidate point of every phase, from estimates at several ``activation_scale`` values
    (``BASIS_SCALES`` -> ``Estimate.to_dict()["phases"]``), in run order; points that differ only by the
    rounding of scaled activations (a few bytes) count as one."""
    by_phase: dict[str, list[PhaseTerms]] = {}
    for scale, phases in by_scale.items():
        for term in terms_from_phases(phases, scale):
            known = by_phase.setdefault(term.name, [])
            if not any(abs(t.other_bytes - term.other_bytes) + abs(t.activation_bytes - term.activation_bytes)
                       + abs(t.temporaries_bytes - term.temporaries_bytes) <= 64 for t in known):
                known.append(term)
    return tuple(t for terms in by_phase.values() for t in terms)


def _peak(sample: Sample, oh: Overheads) -> tuple[float, PhaseTerms]:
    """The largest phase total (first of equals) under ``oh``; estimate adds the workspace to all but init."""
    best: tuple[float, PhaseTerms] | None = None
    for p in sample.phases:
        total = p.other_bytes + oh.activation_scale * p.activation_bytes
        total += oh.cublas_workspace_bytes if p.name != "init" else 0
        if best is None or total > best[0]:
            best = (total, p)
    if best is None:
        raise ValueError(f"sample {sample.key} has no phases")
    return best


def _phases_under(sample: Sample, oh: Overheads) -> dict[str, dict[str, float]]:
    """Each phase's components under ``oh`` (activations scaled, the workspace in ``buffers`` but at init), at the
    candidate point with the largest total, as ``estimate`` builds them."""
    out: dict[str, dict[str, float]] = {}
    for p in sample.phases:
        comps = {k: float(v) for k, v in p.components.items()} or {
            "params": float(p.other_bytes - p.temporaries_bytes), "temporaries": float(p.temporaries_bytes)}
        comps["activations"] = oh.activation_scale * p.activation_bytes
        comps["buffers"] = comps.get("buffers", 0.0) + (oh.cublas_workspace_bytes if p.name != "init" else 0)
        if p.name not in out or sum(comps.values()) > sum(out[p.name].values()):
            out[p.name] = comps
    return out


def predict_sample(sample: Sample, oh: Overheads, *, smooth: bool = False) -> dict[str, float]:
    """Predicted bytes of each quantity, as ``estimate(setup, oh)`` computes them (floats, terms not rounded;
    ``smooth``: reserved rounded up to a segment on average, +half a segment, not to the next one).

    peak = max over phases of (other + s * activations + workspace); reserved by ``core.reserved.reserved_terms``
    over the phases (``NO_BLOCKS`` where the sample has no ``facts``), device by ``overheads.device_from``.
    """
    peak, _ = _peak(sample, oh)
    terms = reserved_terms(_phases_under(sample, oh), sample.facts or NO_BLOCKS, oh)
    # smooth: the rounding to a segment by its mean, half a segment, so the fit sees a continuous function
    reserved = terms.unrounded_bytes + oh.reserved_block_bytes / 2 if smooth else float(terms.total_bytes)
    device = device_from(reserved, oh, peers=sample.peers, real_comm=sample.real_comm)
    return {"peak_allocated": peak, "peak_reserved": reserved, "device": device}


@dataclass(frozen=True, kw_only=True)
class FitResult:
    """Fitted overheads and what the fit could and could not determine."""

    overheads: Overheads
    """Start values with the fitted parameters replaced."""
    fitted: tuple[str, ...]
    """Parameters the data determined."""
    held: tuple[str, ...]
    """Parameters kept at their start value, each explained in ``notes``."""
    rows: dict[str, int]
    """Measured rows used per quantity."""
    notes: tuple[str, ...] = ()


def _unit(name: str) -> float:
    return float(GiB) if "_bytes" in name else 1.0


def _free_parameters(quantity: str, samples: list[Sample], start: Overheads) -> tuple[list[str], list[str]]:
    """(parameters to fit, reasons others are held) for one quantity's rows."""
    free, notes = [], []
    for name in FITTED_FOR[quantity]:
        if name == "nccl_bytes_per_peer" and len({s.peers for s in samples}) < 2:
            notes.append(f"nccl_bytes_per_peer held at {start.nccl_bytes_per_peer}: every measured row has "
                         f"{samples[0].peers} NCCL peers, so it cannot be told apart from cuda_context_bytes")
        elif name == "nccl_communicator_bytes" and len({s.real_comm for s in samples}) < 2:
            notes.append("nccl_communicator_bytes held: the rows are all real or all simulated, so it cannot be "
                         "told apart from cuda_context_bytes")
        elif name == "activation_scale" and not any(_peak(s, start)[1].activation_bytes for s in samples):
            notes.append("activation_scale held: no measured row has activations at its predicted peak")
        elif name in RESERVED_NEEDS and not any(s.facts and RESERVED_NEEDS[name](s.facts) for s in samples):
            notes.append(f"{name} held at {getattr(start, name)}: no measured row has {RESERVED_NEEDS_TEXT[name]}")
        else:
            free.append(name)
    return free, notes


def _fit_quantity(quantity: str, samples: list[Sample], start: Overheads, names: list[str]) -> Overheads:
    from scipy.optimize import least_squares

    if quantity == "peak_reserved":  # the coefficients of the fitted terms, on every row (module docstring)
        samples = [replace(s, facts=replace(s.facts, sequence_reserved_bytes=0)) if s.facts else s for s in samples]

    lower = [BOUNDS[n][0] / _unit(n) for n in names]
    upper = [BOUNDS[n][1] / _unit(n) for n in names]
    bounds = list(zip(lower, upper, strict=True))
    x0 = [min(max(float(getattr(start, n)) / _unit(n), lo), hi)
          for n, (lo, hi) in zip(names, bounds, strict=True)]
    # least_squares' trf scales steps by the distance to a bound and stalls on one: start 1% inside the range.
    inside = [min(max(v, lo + 0.01 * (hi - lo)), hi - 0.01 * (hi - lo))
              for v, (lo, hi) in zip(x0, bounds, strict=True)]
    measured = [float(s.measured[quantity]) for s in samples]

    def overheads_at(x: Sequence[float]) -> Overheads:
        return replace(start, **{n: v * _unit(n) for n, v in zip(names, x, strict=True)})

    def residuals(x: Sequence[float]) -> list[float]:
        oh = overheads_at(x)
        errs = [(predict_sample(s, oh, smooth=True)[quantity] - m) / m
                for s, m in zip(samples, measured, strict=True)]
        return errs + [PRIOR_WEIGHT * (v - v0) for v, v0 in zip(x, x0, strict=True)]

    solution = least_squares(residuals, inside, bounds=(lower, upper), method="trf")
    fitted = overheads_at(solution.x)
    values = {n: getattr(fitted, n) for n in names}
    return replace(fitted, **{n: int(round(v)) if "_bytes" in n else float(v) for n, v in values.items()})


def fit_overheads(samples: Sequence[Sample], start: Overheads | None = None) -> FitResult:
    """Fit ``FITTED_FOR``'s parameters, quantity by quantity, on the rows that measure each quantity."""
    oh = start or Overheads()
    fitted: list[str] = []
    held: list[str] = []
    notes: list[str] = []
    rows: dict[str, int] = {}
    for quantity in QUANTITIES:
        used = [s for s in samples if (s.measured.get(quantity) or 0) > 0]
        rows[quantity] = len(used)
        if not used:
            held += FITTED_FOR[quantity]
            what = quantity.replace("_", " ")
            notes.append(f"{', '.join(FITTED_FOR[quantity])} held: no row measures {what}")
            continue
        free, why = _free_parameters(quantity, used, oh)
        held += [n for n in FITTED_FOR[quantity] if n not in free]
        notes += why
        if free:
            oh = _fit_quantity(quantity, used, oh, free)
            fitted += free
    return FitResult(overheads=replace(oh, source="fitted"), fitted=tuple(fitted), held=tuple(held),
                     rows=rows, notes=tuple(notes))


def group_folds(groups: Sequence[str], k: int = 5) -> list[tuple[list[int], list[int]]]:
    """(train, test) index lists of k-fold cross-validation where each group lies wholly in one test fold.

    Groups go, largest first, to the fold with the fewest rows so far (deterministic; ties by name). ``k`` is
    cut to the number of groups; ValueError for fewer than two groups (nothing could be held out).
    """
    sizes: dict[str, int] = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    if len(sizes) < 2:
        raise ValueError(f"cross-validation by model needs at least 2 models, got {len(sizes)}")
    k = max(2, min(k, len(sizes)))
    members: list[set[str]] = [set() for _ in range(k)]
    load = [0] * k
    for g in sorted(sizes, key=lambda g: (-sizes[g], g)):
        fold = min(range(k), key=lambda f: (load[f], f))
        members[fold].add(g)
        load[fold] += sizes[g]
    out = []
    for fold in members:
        test = [i for i, g in enumerate(groups) if g in fold]
        train = [i for i, g in enumerate(groups) if g not in fold]
        out.append((train, test))
    return out


@dataclass(frozen=True, kw_only=True)
class CrossValidation:
    """Held-out fits: each sample's overheads come from a fit that never saw its model."""

    folds: tuple[tuple[tuple[str, ...], FitResult], ...]
    """(models held out, fit on the other models) per fold."""
    held_out: dict[str, Overheads]
    """Sample key -> overheads fitted without that sample's model."""


def cross_validate(samples: Sequence[Sample], start: Overheads | None = None, k: int = 5) -> CrossValidation:
    """Grouped k-fold cross-validation of ``fit_overheads`` (see ``group_folds``)."""
    samples = list(samples)
    folds = []
    held_out: dict[str, Overheads] = {}
    for train, test in group_folds([s.group for s in samples], k):
        result = fit_overheads([samples[i] for i in train], start)
        models = tuple(sorted({samples[i].group for i in test}))
        folds.append((models, result))
        for i in test:
            held_out[samples[i].key] = replace(result.overheads, source=f"held out ({', '.join(models)})")
    return CrossValidation(folds=tuple(folds), held_out=held_out)

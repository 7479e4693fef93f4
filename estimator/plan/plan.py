"""Capacity planning: every ZeRO setup that fits a cluster, ranked by a step-time proxy.

The search space is a product: ZeRO stage x optimizer offload x parameter offload (the combinations DeepSpeed
accepts) x gradient checkpointing x micro-batch, with gradient accumulation chosen to hit the global batch.
Each (stage, offload, checkpointing) *group* is one family of setups whose device memory grows with the
micro-batch, so ``search.largest_true`` finds the largest micro-batch that fits in about 2 log2(candidates)
estimates, and every smaller one fits too. Fitting setups are ranked by ``speed.step_time`` per token; the
best micro-batch of each group is reported, with its predicted memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from zeroest.estimator.catalog.fit import FIT_MARGIN, margin_text
from zeroest.estimator.catalog.gpus import Gpu, gpu_presets
from zeroest.estimator.core.setup import Optimizer, TrainingSetup, ZeroConfig, ZeroStage
from zeroest.estimator.core.vocab import default_optimizer_impl, offload_allowed
from zeroest.estimator.plan.search import (
    CachedEstimator,
    Memory,
    budget_bytes,
    largest_true,
    max_micro_batch,
    max_seq_len,
    min_gpus,
)
from zeroest.estimator.plan.speed import Hardware, StepTime, hardware_for, step_time
from zeroest.estimator.units import GiB, format_gib

log = logging.getLogger(__name__)

DEFAULT_MICRO_BATCH_LIMIT = 1024
"""Micro-batches tried without ``--global-batch`` (1..1024, accumulation 1)."""


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """Which knobs the plan may turn; each tuple lists the values tried."""

    stages: tuple[int, ...] = (0, 1, 2, 3)
    """ZeRO stages."""
    offload_optimizer: tuple[str, ...] = ("none", "cpu", "nvme")
    """Optimizer offload devices (cpu needs stage >= 1, nvme stage 3)."""
    offload_params: tuple[str, ...] = ("none", "cpu", "nvme")
    """Parameter offload devices (stage 3 with the optimizer offloaded)."""
    grad_ckpt: tuple[bool, ...] = (False, True)
    """Gradient checkpointing off/on."""
    micro_batch_limit: int = DEFAULT_MICRO_BATCH_LIMIT
    """Largest micro-batch tried when no global batch is given."""


@dataclass(frozen=True, kw_only=True)
class PlanRequest:
    """What to plan for. ``base`` gives the model, N_d layout, precision, optimizer, sequence and attention;
    its stage, offload, micro-batch, accumulation and checkpointing are what the plan chooses."""

    base: TrainingSetup
    gpu: Gpu
    """The GPU every rank runs on."""
    margin: float = FIT_MARGIN
    """Fraction of the GPU's memory kept free."""
    global_batch: int | None = None
    """Sequences per optimizer step over all ranks; None: accumulation 1, micro-batch free."""
    host_ram_bytes: int | None = None
    """Host RAM per node; None: not checked."""
    space: SearchSpace = field(default_factory=SearchSpace)
    hardware: Hardware | None = None
    """Figures for the step-time proxy; None: ``speed.hardware_for(gpu)``."""

    def __post_init__(self) -> None:
        budget_bytes(self.gpu.memory_bytes, self.margin)
        if self.global_batch is not None:
            world = self.base.world_size
            if self.global_batch < 1 or self.global_batch % world:
                raise ValueError(
                    f"--global-batch {self.global_batch} is not a positive multiple of N_d = {world} GPUs: "
                    f"use a multiple of {world}, e.g. {max(1, round(self.global_batch / world)) * world}"
                )


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One setup that fits, with its predicted memory and step-time proxy."""

    setup: TrainingSetup
    memory: Memory
    step: StepTime

    @property
    def seconds_per_token(self) -> float:
        return self.step.total_s / self.step.tokens_per_step


@dataclass(frozen=True, kw_only=True)
class Plan:
    """The plan's answer."""

    request: PlanRequest
    candidates: tuple[Candidate, ...]
    """The best setup of each group that fits, fastest first; empty when nothing fits."""
    considered: int
    """Candidate setups in the search space (groups x micro-batches)."""
    fitting: int
    """Candidates that fit the GPU (and host RAM)."""
    evaluations: int
    """Memory estimates actually computed."""
    infeasible: str | None = None
    """Why nothing fits and what would, when ``candidates`` is empty."""

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None


def zero_groups(base: TrainingSetup, space: SearchSpace) -> list[ZeroConfig]:
    """The ZeRO configs of the space DeepSpeed accepts for ``base`` (other knobs kept as in ``base.zero``).

    Optimizer offload needs ZeRO >= 1 (ZeRO-Offload) and Adam/AdamW (DeepSpeedCPUAdam); NVMe optimizer offload
    and any parameter offload need stage 3, parameter offload the optimizer offloaded too
    (``setup.ZeroConfig``).
    """
    groups = []
    for stage in space.stages:
        for opt in space.offload_optimizer:
            for par in space.offload_params:
                if offload_allowed(stage, opt, par, base.optimizer.name):
                    # zero.Init as the base says (--zero-init, or vocab.zero_init_default's rule)
                    groups.append(replace(base.zero, stage=ZeroStage(stage), offload_optimizer=opt,
                                          offload_params=par))
    return groups


def optimizer_for(base: TrainingSetup, zero: ZeroConfig) -> Optimizer:
    """The optimizer implementation DeepSpeed runs with this ZeRO config (``vocab.default_optimizer_impl``)."""
    return replace(base.optimizer, impl=default_optimizer_impl(base.optimizer.name, zero.offload_optimizer))


def micro_batches(request: PlanRequest) -> list[tuple[int, int]]:
    """(micro-batch, accumulation) pairs: divisors of the per-rank batch, or 1..limit with accumulation 1."""
    if request.global_batch is None:
        return [(mb, 1) for mb in range(1, request.space.micro_batch_limit + 1)]
    per_rank = request.global_batch // request.base.world_size
    return [(mb, per_rank // mb) for mb in range(1, per_rank + 1) if per_rank % mb == 0]


def _setup(base: TrainingSetup, zero: ZeroConfig, ckpt: bool, mb: int, accum: int) -> TrainingSetup:
    return replace(
        base,
        zero=zero,
        optimizer=optimizer_for(base, zero),
        workload=replace(base.workload, micro_batch=mb, grad_accum=accum, grad_ckpt=ckpt),
    )


def _fitting_prefix(pairs, make, fits) -> list[tuple[int, int]]:
    """The ``pairs`` (ascending micro-batch) that fit. Runs with accumulation > 1 hold the previous
    micro-step's gradients in forward, so memory is monotone within them and within accumulation 1: the two
    runs are searched apart."""
    multi = [p for p in pairs if p[1] > 1]
    single = [p for p in pairs if p[1] == 1]
    n_multi = largest_true(lambda i: fits(make(*multi[i - 1])), len(multi))
    n_single = largest_true(lambda i: fits(make(*single[i - 1])), len(single))
    return [*multi[:n_multi], *single[:n_single]]


def plan(request: PlanRequest, *, estimator: CachedEstimator | None = None) -> Plan:
    """Search the space of ``request`` and rank what fits (see the module docstring)."""
    est = estimator or CachedEstimator()
    hw = request.hardware or hardware_for(request.gpu)
    budget = budget_bytes(request.gpu.memory_bytes, request.margin)
    pairs = micro_batches(request)
    base = request.base
    n_params = est.numel(base)
    best: list[Candidate] = []
    considered = fitting = 0
    host_bound: list[Memory] = []
    """Groups that fit the GPU at the smallest micro-batch but not the host RAM."""
    for zero in zero_groups(base, request.space):
        for ckpt in request.space.grad_ckpt:
            considered += len(pairs)

            def make(mb, accum, zero=zero, ckpt=ckpt):
                return _setup(base, zero, ckpt, mb, accum)

            first = est.memory(make(*pairs[0]))
            if request.host_ram_bytes is not None and first.cpu_bytes_per_node > request.host_ram_bytes:
                if first.device_bytes <= budget:
                    host_bound.append(first)
                continue
            fit = _fitting_prefix(pairs, make, lambda s: est.device_bytes(s) <= budget)
            fitting += len(fit)
            if not fit:
                continue
            setups = [make(mb, accum) for mb, accum in fit]
            fastest = min(setups, key=lambda s: step_time(s, n_params, hw).total_s / _tokens(s))
            best.append(
                Candidate(setup=fastest, memory=est.memory(fastest), step=step_time(fastest, n_params, hw))
            )
    best.sort(key=lambda c: (c.seconds_per_token, c.memory.device_bytes))
    reason = None if best else infeasible_message(request, est)
    if not best and host_bound:
        least = min(m.cpu_bytes_per_node for m in host_bound)
        reason += (f"; {len(host_bound)} setup group(s) would fit the GPU but need at least {format_gib(least, 1)} "
                   f"of host RAM per node, more than the {format_gib(request.host_ram_bytes, 1)} checked (--host-ram)")
    return Plan(
        request=request,
        candidates=tuple(best),
        considered=considered,
        fitting=fitting,
        evaluations=est.evaluations,
        infeasible=reason,
    )


def _tokens(setup: TrainingSetup) -> int:
    w = setup.workload
    return w.micro_batch * w.seq_len * w.grad_accum * setup.world_size


def frugal_setup(request: PlanRequest) -> TrainingSetup:
    """The least device memory the space allows: its highest stage, most offload, checkpointing, micro-batch
    1.
    """
    space = request.space
    groups = zero_groups(request.base, space)
    if not groups:
        raise ValueError("the search space is empty: allow at least one ZeRO stage and offload combination")
    rank = {"none": 0, "nvme": 1, "cpu": 2}
    zero = max(
        groups,
        key=lambda z: (
            z.stage,
            rank[z.offload_params] > 0,
            rank[z.offload_optimizer] > 0,
            rank[z.offload_params],
            rank[z.offload_optimizer],
        ),
    )
    mb, accum = micro_batches(request)[0]
    return _setup(request.base, zero, any(space.grad_ckpt), mb, accum)


def describe_setup(setup: TrainingSetup) -> str:
    """``ZeRO-2, optimizer offload to cpu, checkpointing``: the knobs a plan chooses, in words."""
    zero = setup.zero
    parts = [f"ZeRO-{int(zero.stage)}"]
    if zero.offload_params != "none":
        parts.append(
            "full offload"
            if zero.offload_params == zero.offload_optimizer
            else f"optimizer offload to {zero.offload_optimizer}, parameters to {zero.offload_params}"
        )
    elif zero.offload_optimizer != "none":
        parts.append(f"optimizer offload to {zero.offload_optimizer}")
    if setup.workload.grad_ckpt:
        parts.append("checkpointing")
    return ", ".join(parts)


def _gib_label(n_bytes: int) -> str:
    """``24 GiB`` for 23.99 GiB (a 4090), ``79.6 GiB`` for an H100: one decimal, ``.0`` dropped."""
    text = f"{n_bytes / GiB:.1f}"
    return f"{text.removesuffix('.0')} GiB"


def infeasible_message(request: PlanRequest, estimator: CachedEstimator | None = None) -> str:
    """One paragraph: why nothing in the space fits, and how many GPUs (or how large ones) would."""
    est = estimator or CachedEstimator()
    frugal = frugal_setup(request)
    mem = est.memory(frugal)
    gpu, world = request.gpu, request.base.world_size
    budget = budget_bytes(gpu.memory_bytes, request.margin)
    size = _gib_label(gpu.memory_bytes)
    where = f"{world} x {size}"
    if mem.device_bytes <= budget:
        return (
            f"every setup that fits {where} needs more host RAM per node than "
            f"{format_gib(request.host_ram_bytes or 0, 1)}: the most frugal ({describe_setup(frugal)}) needs "
            f"{format_gib(mem.cpu_bytes_per_node, 1)}; add host RAM or GPUs (fewer ranks per node)"
        )
    head = (
        f"does not fit on {where} even at micro-batch {frugal.workload.micro_batch} "
        f"with {describe_setup(frugal)}: "
        f"needs {format_gib(mem.device_bytes, 1)} per GPU (peak in the {mem.peak_phase} phase), "
        f"{format_gib(budget, 1)} usable with margin {margin_text(request.margin)}"
    )
    gpus = None
    if frugal.stage > ZeroStage.DISABLED:
        gpus = min_gpus(
            replace(frugal, parallel=replace(frugal.parallel, gpus_per_node=1, nodes=1)),
            gpu.memory_bytes,
            request.margin,
            estimator=est,
        )
    bigger = next(
        (
            p
            for p in sorted(gpu_presets().values(), key=lambda p: p.memory_bytes)
            if p.memory_bytes > gpu.memory_bytes
            and mem.device_bytes <= budget_bytes(p.memory_bytes, request.margin)
        ),
        None,
    )
    larger = f"{_gib_label(bigger.memory_bytes)} GPUs ({bigger.name})" if bigger else None
    if gpus is not None and gpus > world:
        tail = f"needs at least {gpus} GPUs of {size}" + (f", or {larger}" if larger else "")
    else:
        if frugal.stage == ZeroStage.DISABLED:
            why = "ZeRO-0 holds everything on every rank"
        elif mem.peak_phase == "init":
            why = "the peak is deepspeed.initialize holding the whole 16-bit model on every GPU"
        else:
            why = "what stays per GPU (activations, buffers) does not shrink with N_d"
        tail = f"more GPUs of {size} do not help ({why})" + (f"; {larger} would fit" if larger else "")
    return f"{head}; {tail}"


QUERIES: tuple[str, ...] = ("max_micro_batch", "max_seq_len", "min_gpus")
"""The capacity questions ``plan`` answers instead of planning (``search``'s functions of the same names)."""


def capacity_queries(request: PlanRequest, which: list[str]) -> list[dict]:
    """Each query of ``which`` (``QUERIES``) per (stage, offload, checkpointing) group, at the request's workload:
    one dict per group with its knobs and one answer per query (None or 0: nothing fits)."""
    est = CachedEstimator()
    base, gpu, margin = request.base, request.gpu, request.margin
    per_node = base.parallel.gpus_per_node if base.parallel.nodes > 1 else None
    rows = []
    for zero in zero_groups(base, request.space):
        for ckpt in request.space.grad_ckpt:
            setup = replace(base, zero=zero, optimizer=optimizer_for(base, zero),
                            workload=replace(base.workload, grad_ckpt=ckpt))
            row: dict = {"stage": int(zero.stage), "offload_optimizer": zero.offload_optimizer,
                         "offload_params": zero.offload_params, "grad_ckpt": ckpt}
            if "max_micro_batch" in which:
                row["max_micro_batch"] = max_micro_batch(setup, gpu.memory_bytes, margin, estimator=est)
            if "max_seq_len" in which:
                row["max_seq_len"] = max_seq_len(setup, gpu.memory_bytes, margin, estimator=est)
            if "min_gpus" in which:
                row["min_gpus"] = min_gpus(setup, gpu.memory_bytes, margin, gpus_per_node=per_node, estimator=est)
            rows.append(row)
    return rows

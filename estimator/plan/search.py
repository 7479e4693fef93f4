"""Exact searches on the estimate: the largest micro-batch or sequence that fits, the fewest GPUs that hold a
setup.

A setup *fits* a GPU when its predicted device memory (``Estimate.device_bytes``: what nvidia-smi shows for
the process) is at most ``(1 - margin)`` of the GPU's memory. Each search runs the estimate itself, no
approximation: an exponential search (1, 2, 4, ...) brackets the answer, then a binary search pins it. That is
exact when memory is monotone in the searched variable (more micro-batch or tokens never need less memory,
more GPUs never need more); ``tests/test_plan_search.py`` checks this against a brute-force enumeration.

``CachedEstimator`` memoizes ``estimate()`` per setup, so searches that share candidates pay for each once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

from zeroest.estimator.catalog.fit import usable_bytes
from zeroest.estimator.core.architecture import count_params
from zeroest.estimator.core.overheads import Overheads
from zeroest.estimator.core.setup import Parallelism, TrainingSetup

log = logging.getLogger(__name__)

MICRO_BATCH_LIMIT = 2**16
"""Largest micro-batch a search tries: far past any GPU (a 125M model at 128 tokens fills 80 GiB near 2**12).
"""
SEQ_LEN_LIMIT = 2**24
"""Longest sequence a search tries (16M tokens)."""
GPU_LIMIT = 2**16
"""Most GPUs ``min_gpus`` tries (65536 ranks)."""


def budget_bytes(gpu_bytes: int, margin: float) -> int:
    """Device bytes a setup may use: ``catalog.fit.usable_bytes``, ``floor((1 - margin) * gpu_bytes)``; margin is
    a fraction in [0, 1)."""
    return usable_bytes(gpu_bytes, margin)


@dataclass(frozen=True, kw_only=True)
class Memory:
    """The figures of an ``Estimate`` a search needs (bytes)."""

    device_bytes: int
    """``Estimate.device_bytes``: reserved + CUDA context + NCCL, compared with the GPU's memory."""
    peak_allocated_bytes: int
    """``Estimate.peak_allocated_bytes``."""
    peak_reserved_bytes: int
    """``Estimate.peak_reserved_bytes``."""
    cpu_bytes_per_node: int
    """``Estimate.cpu_bytes_per_node``: host RAM per node, compared with ``--host-ram``."""
    nvme_bytes: int
    """``Estimate.nvme_bytes`` per rank."""
    peak_phase: str
    """``Estimate.peak_phase``: init, forward, backward or step."""


class CachedEstimator:
    """``estimate()``'s memory figures, memoized per setup, and the parameter count per model. The reserve comes
    from the fitted terms (``estimate(..., sequence=False)``): a request sequence would trace every candidate;
    ``zeroest.api.plan_request`` replays the pick's.

    A search asks for the same setup more than once (a plan's group starts where a query ended);
    ``estimate()`` itself caches what does not change between candidates (parameter lists, activation
    profiles), so one call costs about 0.2 ms for an 8B model (``benchmarks/bench_plan.py``).
    ``evaluations`` counts the estimates run.
    """

    def __init__(self, overheads: Overheads | None = None) -> None:
        self.overheads = overheads or Overheads()
        self.evaluations = 0
        self._numel: dict = {}
        self._memory: dict = {}

    def numel(self, setup: TrainingSetup) -> int:
        """Exact parameter count of the setup's model."""
        if setup.model not in self._numel:
            self._numel[setup.model] = count_params(setup.model).total
        return self._numel[setup.model]

    def memory(self, setup: TrainingSetup) -> Memory:
        """The figures ``estimate(setup, self.overheads)`` reports."""
        if setup not in self._memory:
            from zeroest.estimator.core.estimate import estimate

            self.evaluations += 1
            est = estimate(setup, self.overheads, sequence=False)  # no trace per candidate: the fitted reserve
            self._memory[setup] = Memory(
                device_bytes=est.device_bytes,
                peak_allocated_bytes=est.peak_allocated_bytes,
                peak_reserved_bytes=est.peak_reserved_bytes,
                cpu_bytes_per_node=est.cpu_bytes_per_node,
                nvme_bytes=est.nvme_bytes,
                peak_phase=est.peak_phase,
            )
        return self._memory[setup]

    def device_bytes(self, setup: TrainingSetup) -> int:
        return self.memory(setup).device_bytes


def largest_true(pred: Callable[[int], bool], limit: int) -> int:
    """The largest n in [1, limit] with pred(n), for pred true up to some n and false after; 0 if pred(1) is
    false.

    Exponential search (1, 2, 4, ...) to bracket the change, then binary search inside the bracket: about 2
    log2(answer) calls of pred.
    """
    if limit < 1 or not pred(1):
        return 0
    good = 1
    bad = None
    while bad is None:
        nxt = min(good * 2, limit)
        if nxt == good:
            return good
        if pred(nxt):
            good = nxt
        else:
            bad = nxt
    while bad - good > 1:
        mid = (good + bad) // 2
        if pred(mid):
            good = mid
        else:
            bad = mid
    return good


def smallest_true(pred: Callable[[int], bool], limit: int) -> int | None:
    """The smallest n in [1, limit] with pred(n), for pred false up to some n and true after; None if none.

    The last n where pred is still false, plus one: ``largest_true`` of the negation.
    """
    if limit < 1:
        return None
    last_false = largest_true(lambda n: not pred(n), limit)
    return None if last_false >= limit else last_false + 1


def _with_workload(setup: TrainingSetup, **changes) -> TrainingSetup:
    return replace(setup, workload=replace(setup.workload, **changes))


def max_micro_batch(
    setup: TrainingSetup,
    gpu_bytes: int,
    margin: float = 0.0,
    *,
    limit: int = MICRO_BATCH_LIMIT,
    estimator: CachedEstimator | None = None,
) -> int:
    """The largest micro-batch with which ``setup`` fits ``gpu_bytes`` keeping ``margin`` free; 0 if 1 does
    not fit.

    Everything else (stage, offload, sequence, checkpointing, accumulation, N_d) stays as in ``setup``.
    """
    est = estimator or CachedEstimator()
    budget = budget_bytes(gpu_bytes, margin)
    return largest_true(lambda mb: est.device_bytes(_with_workload(setup, micro_batch=mb)) <= budget, limit)


def max_seq_len(
    setup: TrainingSetup,
    gpu_bytes: int,
    margin: float = 0.0,
    *,
    limit: int = SEQ_LEN_LIMIT,
    multiple_of: int = 1,
    estimator: CachedEstimator | None = None,
) -> int:
    """The longest sequence (a multiple of ``multiple_of``) with which ``setup`` fits; 0 if none does.

    The model's ``max_positions`` is not a bound here (rotary models extend past it); callers may cap it.
    """
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be 1 or more, got {multiple_of}")
    est = estimator or CachedEstimator()
    budget = budget_bytes(gpu_bytes, margin)
    units = largest_true(
        lambda k: est.device_bytes(_with_workload(setup, seq_len=k * multiple_of)) <= budget,
        limit // multiple_of,
    )
    return units * multiple_of


def layout(world_size: int, gpus_per_node: int | None) -> Parallelism:
    """N_d ranks as nodes: one node of ``world_size`` GPUs, or full nodes of ``gpus_per_node`` (a multiple).
    """
    if gpus_per_node is None or world_size <= gpus_per_node:
        return Parallelism(gpus_per_node=world_size, nodes=1)
    if world_size % gpus_per_node:
        raise ValueError(f"{world_size} GPUs do not make whole nodes of {gpus_per_node}")
    return Parallelism(gpus_per_node=gpus_per_node, nodes=world_size // gpus_per_node)


def _world_at(index: int, gpus_per_node: int | None) -> int:
    """The index-th world size tried: 1, 2, ..., gpus_per_node, then whole nodes 2g, 3g, ..."""
    if gpus_per_node is None or index <= gpus_per_node:
        return index
    return (index - gpus_per_node + 1) * gpus_per_node


def min_gpus(
    setup: TrainingSetup,
    gpu_bytes: int,
    margin: float = 0.0,
    *,
    gpus_per_node: int | None = None,
    limit: int = GPU_LIMIT,
    estimator: CachedEstimator | None = None,
) -> int | None:
    """The fewest GPUs (N_d) on which ``setup`` fits each GPU, or None if none up to ``limit`` do.

    With ``gpus_per_node`` the candidates are 1..gpus_per_node GPUs on one node, then whole nodes; without,
    one node of N_d GPUs (N_d changes device memory the same either way; only host RAM per node differs).
    Stage 0 replicates every state, so more GPUs never help it: the answer is 1 or None.
    """
    est = estimator or CachedEstimator()
    budget = budget_bytes(gpu_bytes, margin)
    if gpus_per_node is None:
        top = limit
    else:
        top = (
            min(limit, gpus_per_node)
            if limit <= gpus_per_node
            else gpus_per_node + limit // gpus_per_node - 1
        )

    def fits(index: int) -> bool:
        parallel = layout(_world_at(index, gpus_per_node), gpus_per_node)
        return est.device_bytes(replace(setup, parallel=parallel)) <= budget

    index = smallest_true(fits, top)
    return None if index is None else _world_at(index, gpus_per_node)

"""The exact searches: cached estimate == estimate(), and every search == brute force over the estimate."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from zeroest.estimator.catalog.models import load_model
from zeroest.estimator.core.estimate import estimate
from zeroest.estimator.core.setup import (
    Optimizer,
    Parallelism,
    TrainingSetup,
    Workload,
    ZeroConfig,
)
from zeroest.estimator.plan.search import (
    CachedEstimator,
    budget_bytes,
    largest_true,
    max_micro_batch,
    max_seq_len,
    min_gpus,
    smallest_true,
)
from zeroest.estimator.units import GiB, MiB

GPT2 = load_model("gpt2")


def setup_of(
    stage=0,
    world=2,
    mb=1,
    seq=512,
    ckpt=False,
    accum=1,
    offload="none",
    params="none",
    dtype="bf16",
    model=GPT2,
) -> TrainingSetup:
    return TrainingSetup(
        model=model,
        parallel=Parallelism(gpus_per_node=world),
        dtype=dtype,
        optimizer=Optimizer(name="adamw", impl="cpu" if offload != "none" else "fused"),
        zero=ZeroConfig(stage=stage, offload_optimizer=offload, offload_params=params),
        workload=Workload(
            micro_batch=mb, seq_len=seq, grad_ckpt=ckpt, grad_accum=accum, activations="closed-form"
        ),
    )


GRID = [
    setup_of(stage=s, world=w, mb=mb, ckpt=c, accum=a, offload=off, params=par, dtype=d)
    for s, off, par in (
        (0, "none", "none"),
        (1, "none", "none"),
        (2, "cpu", "none"),
        (3, "none", "none"),
        (3, "cpu", "cpu"),
    )
    for w in (1, 4)
    for mb, c, a in ((1, False, 1), (4, True, 2))
    for d in ("bf16", "fp32")
]


@pytest.mark.parametrize(
    "setup",
    GRID,
    ids=lambda s: (
        f"z{int(s.stage)}-{s.zero.offload_optimizer}-N{s.world_size}-mb{s.workload.micro_batch}-{s.dtype}"
    ),
)
def test_cached_estimator_reports_estimate(setup):
    est = estimate(setup)
    mem = CachedEstimator().memory(setup)
    assert mem.device_bytes == est.device_bytes
    assert mem.peak_allocated_bytes == est.peak_allocated_bytes
    assert mem.peak_reserved_bytes == est.peak_reserved_bytes
    assert mem.cpu_bytes_per_node == est.cpu_bytes_per_node
    assert mem.nvme_bytes == est.nvme_bytes
    assert mem.peak_phase == est.peak_phase


def test_cache_memoizes_per_setup():
    cached = CachedEstimator()
    for mb in (1, 2, 1, 2, 3):
        cached.memory(setup_of(stage=2, mb=mb))
    assert cached.evaluations == 3


def test_budget_is_margin_of_gpu():
    assert budget_bytes(24 * 2**30, 0.1) == 23_192_823_398  # floor(0.9 * 24 GiB)
    assert budget_bytes(24 * 2**30, 0.0) == 24 * 2**30
    with pytest.raises(ValueError, match="--margin"):
        budget_bytes(24 * GiB, 1.0)


@given(st.integers(min_value=0, max_value=5000), st.integers(min_value=1, max_value=5000))
def test_largest_true_on_threshold(threshold, limit):
    calls = []

    def pred(n):
        calls.append(n)
        return n <= threshold

    assert largest_true(pred, limit) == min(threshold, limit)
    assert all(1 <= n <= limit for n in calls)


@given(st.integers(min_value=1, max_value=5000), st.integers(min_value=1, max_value=5000))
def test_smallest_true_on_threshold(threshold, limit):
    expected = threshold if threshold <= limit else None
    assert smallest_true(lambda n: n >= threshold, limit) == expected


def brute_max(fits, limit):
    """The largest n such that 1..n all fit (and checks nothing past it up to limit fits: monotonicity)."""
    answers = [n for n in range(1, limit + 1) if fits(n)]
    best = 0
    while best + 1 in answers:
        best += 1
    assert answers == list(range(1, best + 1)), f"not monotone: {answers}"
    return best


@pytest.mark.parametrize("stage,ckpt,offload", [(0, False, "none"), (2, False, "none"), (3, True, "cpu")])
def test_max_micro_batch_is_brute_force_maximum(stage, ckpt, offload):
    setup = setup_of(
        stage=stage, ckpt=ckpt, offload=offload, params="cpu" if stage == 3 and offload == "cpu" else "none"
    )
    # A GPU exactly as large as micro-batch 20 needs: the answer is 20, or more where memory plateaus.
    gpu = estimate(replace(setup, workload=replace(setup.workload, micro_batch=20))).device_bytes
    found = max_micro_batch(setup, gpu, 0.0)
    brute = brute_max(
        lambda mb: (
            estimate(replace(setup, workload=replace(setup.workload, micro_batch=mb))).device_bytes <= gpu
        ),
        60,
    )
    assert found == brute
    assert 20 <= found < 60


def test_max_micro_batch_zero_when_one_does_not_fit():
    setup = setup_of(stage=0)
    assert max_micro_batch(setup, estimate(setup).device_bytes - 1) == 0


def test_max_seq_len_is_brute_force_maximum():
    setup = setup_of(stage=1, mb=2)
    gpu = estimate(replace(setup, workload=replace(setup.workload, seq_len=3000))).device_bytes
    found = max_seq_len(setup, gpu, 0.0, multiple_of=128)
    brute = brute_max(
        lambda k: (
            estimate(replace(setup, workload=replace(setup.workload, seq_len=128 * k))).device_bytes <= gpu
        ),
        40,
    )
    assert found == 128 * brute
    assert 2944 <= found <= 3000  # 3000 fits, so the largest multiple of 128 below it does too


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_min_gpus_is_brute_force_minimum(stage):
    model = load_model("pythia-1b")
    setup = setup_of(stage=stage, world=1, model=model)
    at8 = estimate(replace(setup, parallel=Parallelism(gpus_per_node=8))).device_bytes
    found = min_gpus(setup, at8, 0.0)
    fits = [
        w
        for w in range(1, 17)
        if estimate(replace(setup, parallel=Parallelism(gpus_per_node=w))).device_bytes <= at8
    ]
    assert fits == list(range(fits[0], 17)), "device memory must fall monotonically with N_d"
    assert found == fits[0]
    assert found <= 8


def test_min_gpus_whole_nodes():
    setup = setup_of(stage=3, world=1, model=load_model("pythia-1b"))
    at24 = estimate(replace(setup, parallel=Parallelism(gpus_per_node=8, nodes=3))).device_bytes
    found = min_gpus(setup, at24, 0.0, gpus_per_node=8)
    assert found is not None and (found <= 8 or found % 8 == 0)
    assert found <= 24


def test_min_gpus_stage0_never_helps():
    setup = setup_of(stage=0, world=1)
    assert min_gpus(setup, estimate(setup).device_bytes - 64 * MiB, 0.0, limit=64) is None

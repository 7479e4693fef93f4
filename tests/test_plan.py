"""The plan finds what a brute-force enumeration over estimate() finds; the speed proxy's named terms."""

from __future__ import annotations

from dataclasses import replace

import pytest
from zeroest.estimator.catalog.gpus import Gpu
from zeroest.estimator.catalog.models import load_model
from zeroest.estimator.core.estimate import estimate
from zeroest.estimator.core.setup import Parallelism, TrainingSetup, Workload, ZeroStage
from zeroest.estimator.plan.plan import (
    PlanRequest,
    SearchSpace,
    _setup,
    frugal_setup,
    micro_batches,
    plan,
    zero_groups,
)
from zeroest.estimator.plan.search import budget_bytes, min_gpus
from zeroest.estimator.plan.speed import HARDWARE, comm_bytes, compute_flops, offload_seconds, step_time
from zeroest.estimator.units import GiB

PYTHIA = load_model("pythia-410m")


def base_setup(world=2, seq=512, model=PYTHIA) -> TrainingSetup:
    return TrainingSetup(
        model=model,
        parallel=Parallelism(gpus_per_node=world),
        workload=Workload(seq_len=seq, activations="closed-form"),
    )


def request(gpu_gib=8.0, global_batch=32, host=None, world=2, model=PYTHIA, **space) -> PlanRequest:
    return PlanRequest(
        base=base_setup(world=world, model=model),
        gpu=Gpu(name="test", memory_bytes=int(gpu_gib * GiB)),
        margin=0.1,
        global_batch=global_batch,
        host_ram_bytes=host,
        space=SearchSpace(**space),
        hardware=HARDWARE["a100-80g"],
    )


def brute_force(req: PlanRequest):
    """Every candidate through estimate(); (fitting setups, best per group) by the same ranking as plan()."""
    budget = budget_bytes(req.gpu.memory_bytes, req.margin)
    n_params = estimate(req.base).n_params
    fitting, best = [], {}
    for zero in zero_groups(req.base, req.space):
        for ckpt in req.space.grad_ckpt:
            for mb, accum in micro_batches(req):
                setup = _setup(req.base, zero, ckpt, mb, accum)
                est = estimate(setup)
                if est.device_bytes > budget:
                    continue
                if req.host_ram_bytes is not None and est.cpu_bytes_per_node > req.host_ram_bytes:
                    continue
                fitting.append(setup)
                step = step_time(setup, n_params, req.hardware)
                key = step.total_s / step.tokens_per_step
                group = (zero, ckpt)
                if group not in best or key < best[group][0]:
                    best[group] = (key, setup, est.device_bytes)
    ranked = sorted(best.values(), key=lambda kv: (kv[0], kv[2]))
    return fitting, [(key, setup) for key, setup, _ in ranked]


@pytest.mark.parametrize("gpu_gib,global_batch", [(6.0, 32), (10.0, 64), (4.0, 16)])
def test_plan_matches_brute_force(gpu_gib, global_batch):
    req = request(gpu_gib=gpu_gib, global_batch=global_batch)
    result = plan(req)
    fitting, ranked = brute_force(req)
    assert result.fitting == len(fitting)
    assert result.considered == len(zero_groups(req.base, req.space)) * 2 * len(micro_batches(req))
    assert [c.setup for c in result.candidates] == [setup for _, setup in ranked]
    for cand in result.candidates:
        assert cand.memory.device_bytes == estimate(cand.setup).device_bytes
        assert cand.memory.device_bytes <= budget_bytes(req.gpu.memory_bytes, req.margin)


def test_plan_without_global_batch_searches_micro_batches():
    req = request(  # 9 GiB: micro-batch 1 of pythia-410m at ZeRO-2 needs 7.9 (the end-of-backward flatten)
        gpu_gib=9.0, global_batch=None, micro_batch_limit=64, stages=(2,), offload_optimizer=("none",)
    )
    result = plan(req)
    fitting, ranked = brute_force(req)
    assert result.fitting == len(fitting)
    assert result.best.setup == ranked[0][1]
    assert all(c.setup.workload.grad_accum == 1 for c in result.candidates)
    assert result.evaluations < result.considered  # binary search, not enumeration


def test_host_ram_filters_offload():
    unlimited = plan(request(gpu_gib=6.0))
    assert any(c.setup.zero.offload_optimizer != "none" for c in unlimited.candidates)
    smallest_host = min(
        c.memory.cpu_bytes_per_node for c in unlimited.candidates if c.setup.zero.offload_optimizer != "none"
    )
    limited = plan(request(gpu_gib=6.0, host=smallest_host - 1))
    assert all(c.memory.cpu_bytes_per_node < smallest_host for c in limited.candidates)
    assert all(c.setup.zero.offload_optimizer == "none" for c in limited.candidates)


def test_global_batch_must_divide_over_ranks():
    with pytest.raises(ValueError, match="multiple of 2"):
        request(global_batch=33)


def test_zero_groups_are_what_deepspeed_accepts():
    groups = zero_groups(base_setup(), SearchSpace())
    combos = {(int(z.stage), z.offload_optimizer, z.offload_params) for z in groups}
    assert (0, "none", "none") in combos and (0, "cpu", "none") not in combos
    assert (
        (2, "cpu", "none") in combos and (2, "nvme", "none") not in combos and (2, "cpu", "cpu") not in combos
    )
    assert (3, "none", "cpu") not in combos
    # stage 0: 1, stages 1-2: none/cpu, stage 3: none + {cpu, nvme} x {none, cpu, nvme}
    assert len(groups) == 1 + 2 + 2 + 7


def test_infeasible_names_gpus_needed():
    big = load_model("pythia-6.9b")
    req = request(gpu_gib=4.0, model=big, global_batch=2)
    result = plan(req)
    assert result.best is None
    frugal = frugal_setup(req)
    assert frugal.stage == ZeroStage.PARAMETERS and frugal.workload.grad_ckpt
    assert frugal.zero.offload_optimizer == "cpu" and frugal.zero.offload_params == "cpu"
    assert "does not fit on 2 x 4 GiB even at micro-batch 1" in result.infeasible
    need = min_gpus(replace(frugal, parallel=Parallelism()), req.gpu.memory_bytes, req.margin)
    if need is not None:
        assert f"needs at least {need} GPUs of 4 GiB" in result.infeasible
    else:
        assert "more GPUs of 4 GiB do not help" in result.infeasible


def test_compute_flops_six_and_eight_p_per_token():
    setup = base_setup()
    n = estimate(setup).n_params
    tokens = setup.workload.micro_batch * setup.workload.seq_len
    assert compute_flops(setup, n) == 6 * n * tokens
    ckpt = replace(setup, workload=replace(setup.workload, grad_ckpt=True, grad_accum=3))
    assert compute_flops(ckpt, n) == 8 * n * tokens * 3


@pytest.mark.parametrize("stage,accum,factor", [(0, 4, 2), (1, 4, 2), (2, 4, 5), (3, 4, 12), (3, 1, 3)])
def test_comm_volume_per_zero_paper(stage, accum, factor):
    """2 Psi for stages 0-2 and 3 Psi for stage 3 (ZeRO paper Sec. 7), per micro-step where DeepSpeed does."""
    world = 4
    setup = base_setup(world=world).with_stage(stage)
    setup = replace(setup, workload=replace(setup.workload, grad_accum=accum))
    psi = 2 * 1_000_000
    assert comm_bytes(setup, 1_000_000) == pytest.approx(factor * psi * (world - 1) / world)
    assert comm_bytes(replace(setup, parallel=Parallelism()), 1_000_000) == 0


def test_offload_traffic_terms():
    hw = HARDWARE["h100"]
    setup = base_setup(world=4).with_stage(2)
    assert offload_seconds(setup, 10**9, hw) == 0
    off = replace(
        setup,
        zero=replace(setup.zero, offload_optimizer="cpu"),
        optimizer=replace(setup.optimizer, impl="cpu"),
    )
    part = 10**9 / 4
    expected = part / hw.cpu_adam_params_per_s + 2 * 2 * part / hw.pcie_bytes_per_s  # grads down, params up
    assert offload_seconds(off, 10**9, hw) == pytest.approx(expected)

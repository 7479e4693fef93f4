"""Scaling laws of the model states (hypothesis): sharded terms fall as 1/N_d, stages order, offload conserves."""

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st
from zeroest.estimator.catalog.models import load_model, standard_shape
from zeroest.estimator.core.architecture import count_params, param_tensors
from zeroest.estimator.core.estimate import model_states
from zeroest.estimator.core.setup import (
    Optimizer,
    Parallelism,
    TrainingSetup,
    Workload,
    ZeroConfig,
    ZeroStage,
)

SHAPES = [load_model("gpt2"), load_model("pythia-410m"), load_model("llama-2-7b"), standard_shape(1_300_000_000)]
shapes = st.sampled_from(SHAPES)
worlds = st.sampled_from([2, 4, 8, 16, 64, 256])
dtypes = st.sampled_from(["bf16", "fp16"])


def padded(numel: int, world: int) -> int:
    """stage_1_and_2.py: the flat group rounded up to ``nccl_start_alignment_factor * N_d`` = 2 N_d elements."""
    return -(-numel // (2 * world)) * 2 * world


def setup(shape, world, stage, dtype="bf16", offload="none", impl="fused"):
    return TrainingSetup(model=shape, parallel=Parallelism(gpus_per_node=world), dtype=dtype,
                         optimizer=Optimizer(impl=impl), zero=ZeroConfig(stage=stage, offload_optimizer=offload),
                         workload=Workload(activations="closed-form"))


@settings(max_examples=40, deadline=None)
@given(shapes, worlds, dtypes, st.sampled_from([1, 2, 3]))
def test_sharded_terms_fall_as_one_over_n(shape, world, dtype, stage):
    one, many = model_states(setup(shape, 1, stage, dtype)), model_states(setup(shape, world, stage, dtype))
    tensors = len(param_tensors(shape))
    # padding: stages 1-2 pad the flat group to 2 N_d elements; stage 3 pads each tensor to N_d elements
    pad_elements = 2 * world if stage < 3 else world * tensors
    for name, per_element in (("master_weights_bytes", 4), ("optimizer_states_bytes", 8)):
        whole, part = getattr(one, name), getattr(many, name)
        assert whole <= part * world <= whole + per_element * pad_elements, name
    if stage >= ZeroStage.PARAMETERS:
        assert many.params_bytes < one.params_bytes
    else:
        psi = count_params(shape).total
        assert many.params_bytes == one.params_bytes + 2 * (padded(psi, world) - padded(psi, 1))


@settings(max_examples=40, deadline=None)
@given(shapes, worlds, dtypes)
def test_later_stages_hold_less(shape, world, dtype):
    """Model states at the end of backward: stage 3 <= 2 <= 1 <= 0 at N_d >= 2 (with buckets no larger than a
    partition, as DeepSpeed's buckets are fixed-size and can exceed the states of a small model)."""
    def total(stage):
        zero = ZeroConfig(stage=stage, reduce_bucket_size=10**6, prefetch_bucket_size=10**6)
        s = TrainingSetup(model=shape, parallel=Parallelism(gpus_per_node=world), dtype=dtype, zero=zero,
                          workload=Workload(activations="closed-form"))
        m = model_states(s)
        return m.steady_bytes + m.grads_bytes + m.buckets_bytes
    t0, t1, t2, t3 = (total(s) for s in range(4))
    assert t3 <= t2 <= t1 <= t0


@settings(max_examples=30, deadline=None)
@given(shapes, worlds, st.sampled_from([1, 2]))
def test_offload_moves_bytes_without_changing_what_is_stored(shape, world, stage):
    gpu = model_states(setup(shape, world, stage))
    off = model_states(setup(shape, world, stage, offload="cpu", impl="cpu"))
    moved = gpu.master_weights_bytes + gpu.optimizer_states_bytes
    assert off.master_weights_bytes == 0 and off.optimizer_states_bytes == 0
    assert off.params_bytes == gpu.params_bytes
    # on the host: the same master weights and states, plus DeepSpeed's fp32 gradient partition (4p), the pinned
    # 16-bit partition (2p) and the CPU gradient staging buffer of the largest parameter (2 n_max); every buffer
    # DeepSpeed pins (master, gradient partition, 16-bit copy, staging) is a power of two (pin_memory: torch's
    # host caching allocator), the states are pageable
    part = padded(count_params(shape).total, world) // world
    n_max = max(t.numel for t in param_tensors(shape))

    def pow2(n: int) -> int:
        return 1 << (n - 1).bit_length()

    states = gpu.optimizer_states_bytes
    assert off.host_bytes == pow2(4 * part) + states + pow2(4 * part) + pow2(2 * part) + pow2(2 * n_max)
    assert off.host_pageable_bytes == states and moved == 4 * part + states
    offloaded = setup(shape, world, stage, offload="cpu", impl="cpu")
    unpinned = model_states(replace(offloaded, zero=replace(offloaded.zero, pin_memory=False)))
    assert offloaded.zero.pin_memory and unpinned.host_bytes == moved + 4 * part + 2 * part + 2 * n_max

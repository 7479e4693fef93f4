"""Model states with frozen parameters (LoRA, --freeze, modules_to_save), from named terms.

P_t trainable and P_f frozen elements (``core.adapters.trainable_split``), b bytes of the training dtype, N = N_d,
P'_t the trainable flat group padded to 2N, p_t = P'_t / N, P3 (P3_t) the sum of ceil(n / N) over all (trainable)
parameters. DeepSpeed keeps only ``requires_grad`` parameters in its optimizer groups (utils.py
``is_optimized_parameter``), so the optimizer side counts P_t; the 16-bit weights count every parameter.
"""

from __future__ import annotations

import pytest
from zeroest.estimator.catalog.models import load_model
from zeroest.estimator.configs.flat import setup_from_dict
from zeroest.estimator.core.adapters import Adapters, trainable_split
from zeroest.estimator.core.architecture import count_params, param_tensors
from zeroest.estimator.core.estimate import estimate, model_states
from zeroest.estimator.core.model_states import FP32, flat_group_numel, pinned_bytes, stage2_grad_numel, trained
from zeroest.estimator.core.stage3 import gathered_numel, partition_numel, recompute_gathered_numel
from zeroest.estimator.core.timeline import _grads_at_backward_start

LLAMA = load_model("llama-3-8b")
LORA = dict(lora_rank=16)


def setup(stage: int, world: int = 8, **extra):
    return setup_from_dict({"world_size": world, "stage": stage, "activations": "closed-form", "seq_len": 1024,
                            **extra}, model=LLAMA)


def lora_numel(r: int) -> int:
    """all-linear LoRA on llama: r (in + out) per wrapped Linear, lm_head left out (tests/test_adapters.py)."""
    h, q, kv, f = LLAMA.hidden_size, LLAMA.q_hidden_size, LLAMA.kv_hidden_size, LLAMA.intermediate_size
    return LLAMA.num_layers * r * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + f) + (f + h))


def test_full_fine_tune_trains_every_parameter_in_order():
    assert trained(setup(2)).trainable == param_tensors(LLAMA)


@pytest.mark.parametrize("world", [1, 8, 64])
def test_stage12_optimizer_side_counts_trainable_only(world):
    """stage_1_and_2.py: bit16_groups_flat b P'_t, master 4 p_t, Adam states 8 p_t; frozen weights b P_f whole."""
    p_t, p_f = lora_numel(16), count_params(LLAMA).total
    part = flat_group_numel(p_t, world) // world
    for stage in (1, 2):
        states = model_states(setup(stage, world, **LORA))
        assert states.params_bytes == 2 * flat_group_numel(p_t, world) + 2 * p_f
        assert states.master_weights_bytes == FP32 * part
        assert states.optimizer_states_bytes == 2 * FP32 * part
    assert model_states(setup(1, world, **LORA)).grads_bytes == 2 * p_t  # param.grad of trainable params
    split = trained(setup(2, world, **LORA))
    assert model_states(setup(2, world, **LORA)).grads_bytes == 2 * stage2_grad_numel(split, world)


def test_stage2_gradient_partition_overlaps_trainable_tensors():
    """grads_in_partition: whole trainable tensors overlapping a rank's slice, never a frozen weight."""
    split = trained(setup(2, 8, **LORA))
    largest_lora = max(t.numel for t in split.trainable)
    assert stage2_grad_numel(split, 8) <= flat_group_numel(lora_numel(16), 8) // 8 + 2 * largest_lora


def test_stage0_flattens_trainable_params_only():
    """FP16_UnfusedOptimizer: an fp32 master per trainable parameter, states at init; the model keeps b P."""
    p_t, p = lora_numel(16), count_params(LLAMA).total + lora_numel(16)
    states = model_states(setup(0, 1, **LORA))
    assert (states.params_bytes, states.master_weights_bytes) == (2 * p, FP32 * p_t)
    assert states.optimizer_states_bytes == 2 * FP32 * p_t and states.states_at_init
    assert states.grads_bytes == 2 * p_t


@pytest.mark.parametrize("world", [2, 8])
def test_stage3_partitions_every_parameter_and_optimizes_the_trainable(world):
    """Every parameter partitioned (b P3 + persistent whole); master 4 P3_t, grad buffer b P3_t."""
    s = setup(3, world, **LORA)
    split = trained(s)
    threshold = s.zero.param_persistence_threshold
    tensors = (*split.trainable, *split.frozen)
    p3 = sum(partition_numel(t.numel, world) for t in tensors)
    p3_t = sum(partition_numel(t.numel, world) for t in split.trainable)
    persistent = sum(partition_numel(t.numel, world) * world for t in tensors if t.numel < threshold)
    states = model_states(s)
    assert states.params_bytes == 2 * (p3 + persistent)
    assert states.master_weights_bytes == FP32 * p3_t
    assert states.optimizer_states_bytes == 2 * FP32 * p3_t
    assert states.resident_buffers_bytes == 2 * p3_t + 2 * s.zero.reduce_bucket_size


def test_stage3_recompute_keeps_a_layers_frozen_weights_gathered():
    """PR #8148: frozen params fetched by a checkpoint recompute stay gathered until the backward submodule ends,
    whatever stage3_max_live_parameters: a layer's frozen weights (llama-2-70b: 856 M > its 262 M embedding), in
    a layer's backward only. (llama-2-7b's last layer and lm_head, 333 M, stay gathered from forward anyway: their
    next use is within stage3_max_reuse_distance, ``stage3_fetch.reuse_retained_numel``; 70b's last layer is not.)"""
    model = load_model("llama-2-70b")
    small = dict(world_size=8, stage=3, activations="closed-form", max_live_parameters=1_000_000,
                 prefetch_bucket_size=1_000_000)
    layer = sum(t.numel for t in param_tensors(model) if ".layers.0." in t.name and t.numel >= 100_000)
    largest = max(t.numel for t in param_tensors(model))
    assert layer > largest
    with_ckpt = setup_from_dict({"grad_ckpt": True, **small, **LORA}, model=model)
    assert gathered_numel(with_ckpt) == largest
    assert recompute_gathered_numel(with_ckpt) == layer - largest
    assert model_states(with_ckpt).recompute_gathered_bytes == 2 * (layer - largest)
    for other in ({"grad_ckpt": False, **LORA}, {"grad_ckpt": True}):  # no recompute; nothing frozen
        assert recompute_gathered_numel(setup_from_dict({**small, **other}, model=model)) == 0
    est = estimate(setup_from_dict({"grad_ckpt": True, **small, **LORA, "seq_len": 256}, model=model))
    backward = next(p for p in est.phases if p.name == "backward")
    forward = next(p for p in est.phases if p.name == "forward")
    assert backward.components["buffers"] - forward.components["buffers"] >= 2 * (layer - largest)


@pytest.mark.parametrize(("adapters", "head"), [
    (LORA, 0),  # lm_head and the final norm frozen: no gradient before the first layer
    (dict(lora_rank=16, modules_to_save="lm_head"), LLAMA.vocab_size * LLAMA.hidden_size),
    (dict(freeze="embeddings"), LLAMA.vocab_size * LLAMA.hidden_size + LLAMA.hidden_size),
])
def test_head_gradients_are_the_trainable_heads(adapters, head):
    s = setup(1, 8, **adapters)
    assert _grads_at_backward_start(s, model_states(s)) == 2 * head


def test_offload_host_bytes_cover_the_trainable_partition():
    """Offload: pinned master, fp32 grad and 16-bit copy of p_t, pageable states 8 p_t, and a pinned b * n_max_t
    staging buffer (pinned buffers take the next power of two, ``model_states.pinned_bytes``)."""
    s = setup(2, 8, offload_optimizer="cpu", optimizer_impl="cpu", **LORA)
    part = flat_group_numel(lora_numel(16), 8) // 8
    n_max = max(t.numel for t in trained(s).trainable)
    pin = [pinned_bytes(n, True) for n in (4 * part, 4 * part, 2 * part, 2 * n_max)]
    assert model_states(s).host_bytes == sum(pin) + 8 * part
    assert model_states(s, device="cpu").host_bytes == (4 + 8 + 4 + 2) * part + 2 * n_max  # nothing pinned on a CPU


def test_stage12_flat_buffer_is_the_trainable_group():
    """The capacity check compares free memory with the flat buffer, b P'_t; the card holds all of b P."""
    from zeroest.estimator.core.capacity import flatten_decision
    from zeroest.estimator.core.overheads import Overheads

    s = setup(2, 8, **LORA)
    split = trained(s)
    decision = flatten_decision(s, split.total_numel, Overheads(), real_comm=False,
                                trainable_numel=split.trainable_numel)
    assert decision.flat_buffer_bytes == 2 * flat_group_numel(lora_numel(16), 8)


def test_lora_estimate_is_far_below_full_and_says_what_it_models():
    full, lora = estimate(setup(2, 8)), estimate(setup(2, 8, **LORA))
    assert lora.components["optimizer_states"] * 100 < full.components["optimizer_states"]
    note = next(n for n in lora.assumptions if n.startswith("LoRA/frozen"))
    assert f"{lora_numel(16):,} of" in note and "full fine-tune" not in note
    assert not any(n.startswith("LoRA/frozen") for n in full.assumptions)


def test_modules_to_save_copy_follows_its_module():
    """peft ModulesToSaveWrapper registers modules_to_save after original_module: named_parameters order."""
    split = trainable_split(LLAMA, Adapters(lora_rank=8, modules_to_save="embed_tokens"))
    assert split.trainable[0].name == "model.embed_tokens.modules_to_save.default.weight"

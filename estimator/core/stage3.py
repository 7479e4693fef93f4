"""Stage 3 model states: runtime/zero/stage3.py ``DeepSpeedZeroOptimizer_Stage3`` and partition_parameters.py.

Same notation as ``estimator.model_states``. Stage 3 partitions every parameter separately: a parameter of n
elements keeps ``ceil(n / N)`` elements on each rank (partition_parameters.py ``_partition_param``, padding from
``_padding_size``), so P3 = sum over parameters of ceil(n / N).

Frozen parameters (LoRA, ``--freeze``): every module parameter is partitioned, frozen ones too (``Init`` /
``_convert_to_zero_parameters`` convert all of them), so the 16-bit partitions cover P3 over all parameters, and
persistence (parameter_offload.py ``mark_persistent_parameters``) applies to all. The optimizer side covers the
trainable ones only: ``DeepSpeedZeroOptimizer_Stage3.__init__`` builds ``trainable_param_groups`` with
``_get_trainable_parameter_groups`` (``utils.py is_optimized_parameter``: ``requires_grad`` and numel > 0), and
``fp16_groups``, ``fp16_partitioned_groups_flat``, ``fp32_partitioned_groups_flat``, ``grad_partitions_flat_buffer``
and the optimizer states are built from those: P3_t = sum over trainable parameters of ceil(n / N). A frozen
parameter's partition stays its own ``ds_tensor`` (b ceil(n / N)), outside the flat group.
"""

from __future__ import annotations

import re

from zeroest.estimator.core.adapters import TrainableSplit
from zeroest.estimator.core.architecture import param_tensors
from zeroest.estimator.core.model_states import (
    FP32,
    Device,
    ModelStates,
    optimizer_temp_bytes,
    pinned_bytes,
    state_bytes,
    trained,
)
from zeroest.estimator.core.setup import DTYPE_BYTES, TrainingSetup
from zeroest.estimator.core.stage3_fetch import reuse_retained_numel
from zeroest.estimator.units import ceil_div

_LAYER = re.compile(r"\.(?:layers|h|layer)\.\d+\.")
"""A decoder layer's place in an HF parameter name (``model.layers.3.``, ``transformer.h.3.``)."""


def partition_numel(numel: int, world_size: int) -> int:
    """Elements of one parameter held per rank: ceil(n / N) (partition_parameters.py ``_partition_param``)."""
    return ceil_div(numel, world_size)


def _layer_frozen_numel(split: TrainableSplit, threshold: int) -> int:
    """Largest sum over one decoder layer of its frozen, non-persistent parameters (elements)."""
    per_layer: dict[str, int] = {}
    for t in split.frozen:
        match = _LAYER.search(t.name)
        if match and t.numel >= threshold:
            per_layer[match.group(0)] = per_layer.get(match.group(0), 0) + t.numel
    return max(per_layer.values(), default=0)


def gathered_numel(setup: TrainingSetup) -> int:
    """Elements held gathered whole at the end of a steady-state forward and into backward.

    partitioned_param_coordinator.py: in the first step DeepSpeed records the module trace and releases each module's
    parameters after use. From the second step on, ``fetch_sub_module`` prefetches ahead of use while fewer than
    ``stage3_max_live_parameters`` L elements are gathered (``__n_available_params``), up to
    ``stage3_prefetch_bucket_size`` B at a time, and a prefetched parameter is not released before its use: about
    L + B elements stay gathered (at least the largest tensor). Independently, ``release_sub_module`` keeps the
    parameters whose next use lies within ``stage3_max_reuse_distance`` (``stage3_fetch.reuse_retained_numel``), so
    with a small L the end of forward holds those instead. Persistent parameters are whole anyway and not counted
    again. With N_d = 1 and no parameter offload a "gathered" parameter is its own partition: nothing extra.
    Measured on an H100 (data/runs/h100-default): pythia-1b N_d = 2 holds its whole 16-bit model gathered at the
    end of forward; gpt2-large N_d = 4 with L = 1e8 holds 5.2e8 elements (1.04e9 bytes more in step 1's forward
    than in step 0's, beyond the optimizer states; data/runs/h100-holdout). Frozen parameters are gathered like
    trainable ones (a frozen Linear's weight is needed again in backward for the input's gradient), so the sum runs
    over every parameter, adapters included.
    """
    if setup.world_size == 1 and setup.zero.offload_params == "none":
        return 0
    split = trained(setup)
    threshold = setup.zero.param_persistence_threshold
    big = [t.numel for t in (*split.trainable, *split.frozen) if t.numel >= threshold]
    if not big:
        return 0
    retained = reuse_retained_numel(param_tensors(setup.model), tied=setup.model.tied_embeddings,
                                    grad_ckpt=setup.workload.grad_ckpt, persistence_threshold=threshold,
                                    reuse_distance=setup.zero.max_reuse_distance)
    return min(sum(big), max(max(big), setup.zero.max_live_parameters + setup.zero.prefetch_bucket_size, retained))


def recompute_gathered_numel(setup: TrainingSetup) -> int:
    """Elements gathered during a layer's backward beyond ``gathered_numel``, with gradient checkpointing and frozen
    parameters: max(0, F_l - gathered_numel), F_l the largest sum of one decoder layer's frozen, non-persistent
    parameters.

    DeepSpeed 0.19.8 (PR #8148 "Z3: Support for activation ckpt with frozen params"; before it such a recompute
    failed with a CheckpointError, PR #8130): partitioned_param_coordinator.py ``fetch_sub_module`` attributes a
    frozen parameter fetched during a checkpoint recompute (``torch._C._current_graph_task_id() != -1``) to the
    active backward submodule (``update_recompute_parameters``), ``release_sub_module`` does not release it at the
    recompute's forward release, and releases it with that submodule's backward. A recomputed layer's frozen weights
    are therefore gathered together during its backward,
    however small ``stage3_max_live_parameters`` is; the forward and the head's backward are unaffected. Measured on
    the CPU (tests/test_lora_states_deepspeed.py): tiny llama + LoRA, N_d = 4, backward 528,384 elements gathered = its
    three frozen MLP weights, forward 262,144 = its largest tensor.
    """
    if not setup.workload.grad_ckpt or (setup.world_size == 1 and setup.zero.offload_params == "none"):
        return 0
    split = trained(setup)
    if not split.frozen:
        return 0
    return max(0, _layer_frozen_numel(split, setup.zero.param_persistence_threshold) - gathered_numel(setup))


def convert_peak_bytes(setup: TrainingSetup) -> int:
    """Peak while stage 3 partitions a model that was built whole: b * P + b * ceil(n_0 / N).

    parameter_offload.py ``_convert_to_zero_parameters`` runs partition_parameters.py ``Init(module=...)``, whose
    ``_convert_to_zero_parameters`` partitions one parameter at a time (``_zero_init_param`` -> ``_partition_param``):
    it allocates the rank's partition, ceil(n / N) elements (on the host with ``offload_param``), copies its slice
    and frees the whole parameter (``free_param``) before the next. Live bytes fall with every parameter done, so
    the peak is at the first one, n_0 (the token embedding): the whole 16-bit model plus its partition. The flat
    buffer ``defragment`` builds afterwards (b P3 beside the partitions) is below this for N >= 2. Measured on an
    H200 (data/runs/h200-zeroinit, no zero.Init, N_d = 64): llama-3-8b init 14.973 GiB against b * P = 14.958
    (b * ceil(n_0 / N) = 0.015).
    """
    split = trained(setup)  # the whole model, adapters included; n_0 the first of ``named_parameters``
    b = DTYPE_BYTES[setup.dtype]
    first = param_tensors(setup.model)[0].numel
    first = 0 if setup.zero.offload_params != "none" else b * partition_numel(first, setup.world_size)
    return b * sum(t.numel for t in (*split.trainable, *split.frozen)) + first


def stage3_states(setup: TrainingSetup, device: Device = "cuda") -> ModelStates:
    """Stage 3, per rank.

    * params: ``fp16_partitioned_groups_flat`` (b P3_t, ``_create_fp16_partitions_with_defragmentation``) and the
      frozen parameters' own ``ds_tensor`` (b (P3 - P3_t)), plus the
      persistent parameters (numel < ``stage3_param_persistence_threshold``) held whole on every rank, padded:
      b * ceil(n/N) * N each (parameter_offload.py ``mark_persistent_parameters``). With ``offload_param`` the
      partitions live on the host; persistent parameters stay on the GPU.
    * master: ``fp32_partitioned_groups_flat`` (``_create_fp32_partitions``), 4 P3_t.
    * states: S * 4 P3_t, at the first step.
    * resident: ``grad_partitions_flat_buffer`` (b P3_t, ``gradient_accumulation_dtype`` = the model dtype by
      default) and one ipg bucket (b B_r, not doubled by overlap_comm), both allocated in
      ``_setup_for_real_optimizer`` at init and kept.
    * step: per sub-group of g = min(P3_t, sub_group_size) elements, ``_prepare_fp32_grad_for_sub_group`` flattens
      the 16-bit gradients (bg) and converts them to fp32 (4g) at once, then the optimizer's temporaries.
    * offload: master, its fp32 gradient (4 P3_t, from init: ``initialize_optimizer_states``), states and the
      gradient buffer on the host; NVMe takes the optimizer side (``offload_optimizer.device: nvme``) and/or the
      parameter partitions (``offload_param.device: nvme``; all of them, b P3, frozen too:
      partition_parameters.py ``_partition_param`` puts every ``ds_tensor`` on the remote device). With
      ``pin_memory`` the fp32 gradient of each sub-group (``subgroup_gradient_buffer``), ``grad_partitions_flat_buffer``
      and the host parameter flat buffer (``param_groups_fp16_flat_cpu_memory``, trainable partitions only) are
      page-locked, each rounded up to a power of two
      (``model_states.pinned_bytes``); master and states are pageable (``_create_fp32_partitions``: ``.clone()``).
      With ``offload_param`` on the CPU each parameter's partition is first pinned on its own
      (partition_parameters.py ``_partition_param``: ``get_accelerator().pin_memory(partitioned_tensor)``), sum of
      pin(b ceil(n_i / N)), and stays held after the copy into the flat buffer (measured: qwen2.5-0.5b N_d 1,
      1.77 GiB of host RSS beyond the other terms and the process baseline against 1.73 GiB of this sum;
      pythia-1b N_d 1: 2.07 vs 2.13; N_d 8: 0.30 vs 0.27; data/runs/h100-default).
    """
    b = DTYPE_BYTES[setup.dtype]
    world = setup.world_size
    split = trained(setup)
    tensors = (*split.trainable, *split.frozen)
    threshold = setup.zero.param_persistence_threshold
    p3 = sum(partition_numel(t.numel, world) for t in tensors)
    p3_t = sum(partition_numel(t.numel, world) for t in split.trainable)
    persistent = sum(partition_numel(t.numel, world) * world for t in tensors if t.numel < threshold)
    offload_opt = setup.zero.offload_optimizer != "none"
    offload_params = setup.zero.offload_params != "none"
    group = min(p3_t, setup.zero.sub_group_size) if setup.zero.sub_group_size else p3_t
    master = FP32 * p3_t
    states = state_bytes(setup, p3_t)
    bucket = b * setup.zero.reduce_bucket_size if setup.zero.contiguous_gradients else 0
    grad_buffer = b * p3_t
    pinned = setup.zero.pin_memory and device == "cuda"
    groups = [group] * (p3_t // group) + ([p3_t % group] if p3_t % group else []) if group else []
    fp32_grads = sum(pinned_bytes(FP32 * g, pinned) for g in groups)
    optimizer_side = master + states + fp32_grads + pinned_bytes(grad_buffer, pinned)
    host = (optimizer_side if setup.zero.offload_optimizer == "cpu" else 0)
    if setup.zero.offload_params == "cpu":
        # the flat host buffer holds the trainable partitions; a frozen partition stays its own (pinned) ds_tensor
        host += pinned_bytes(b * p3_t, pinned)
        host += (sum(pinned_bytes(b * partition_numel(t.numel, world), pinned) for t in tensors) if pinned
                 else b * (p3 - p3_t))
    nvme = (master + states if setup.zero.offload_optimizer == "nvme" else 0)
    nvme += b * p3 if setup.zero.offload_params == "nvme" else 0
    if setup.zero.offload_optimizer == "nvme":
        host += FP32 * p3_t + grad_buffer
    resident = bucket + (0 if offload_opt else grad_buffer)
    params = b * persistent + (0 if offload_params else b * p3)
    step_temp = 0 if offload_opt else max((b + FP32) * group,
                                          FP32 * group + optimizer_temp_bytes(setup, (group,), device))
    n_max = max(t.numel for t in tensors)
    return ModelStates(
        params_bytes=params,
        master_weights_bytes=0 if offload_opt else master,
        optimizer_states_bytes=0 if offload_opt else states,
        states_at_init=False,
        grads_bytes=0,
        grads_carry_bytes=0,
        buckets_bytes=0,
        resident_buffers_bytes=resident,
        gathered_params_bytes=b * gathered_numel(setup),
        recompute_gathered_bytes=b * recompute_gathered_numel(setup),
        epilogue_bytes=0,
        step_grads_bytes=0,
        step_temp_bytes=step_temp,
        # init: the whole model while its partitions are made (not under zero.Init; ``convert_peak_bytes``), or
        # the steady buffers plus the largest parameter gathered whole once (data/probe/llama_z3_bf16_n4_g1*.json)
        init_peak_bytes=max(0 if setup.zero.builds_partitioned else convert_peak_bytes(setup),
                            b * p3 + (0 if offload_opt else master) + resident + b * n_max),
        host_bytes=host,
        host_pageable_bytes=master + states if setup.zero.offload_optimizer == "cpu" else 0,
        nvme_bytes=nvme,
    )

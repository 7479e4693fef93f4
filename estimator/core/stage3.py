"""Stage 3 model states: runtime/zero/stage3.py ``DeepSpeedZeroOptimizer_Stage3`` and partition_parameters.py.

Same notation as ``estimator.model_states``. Stage 3 partitions every parameter separately: a parameter of n
elements keeps ``ceil(n / N)`` elements on each rank (partition_parameters.py ``_partition_param``, padding from
``_padding_size``), so P3 = sum over parameters of ceil(n / N).
"""

from __future__ import annotations

from zeroest.estimator.core.architecture import param_tensors
from zeroest.estimator.core.model_states import (
    FP32,
    Device,
    ModelStates,
    optimizer_state_bytes,
    optimizer_temp_bytes,
    pinned_bytes,
)
from zeroest.estimator.core.setup import DTYPE_BYTES, TrainingSetup
from zeroest.estimator.units import ceil_div


def partition_numel(numel: int, world_size: int) -> int:
    """Elements of one parameter held per rank: ceil(n / N) (partition_parameters.py ``_partition_param``)."""
    return ceil_div(numel, world_size)


def gathered_numel(setup: TrainingSetup) -> int:
    """Elements held gathered whole during a steady-state forward and into backward.

    partitioned_param_coordinator.py: in the first step DeepSpeed records the module trace and releases each module's
    parameters after use; from the second step on, ``release_sub_module`` keeps a parameter whose next use is within
    ``stage3_max_reuse_distance`` (1e9 elements by default), and every forward use is followed by a backward use, so
    parameters stay gathered from their forward until their backward, up to ``stage3_max_live_parameters`` (plus the
    prefetch bucket in flight). Persistent parameters are whole anyway and not counted again. With N_d = 1 and no
    parameter offload a "gathered" parameter is its own partition: nothing extra. Measured on an H100
    (data/runs/h100-default): pythia-1b N_d = 2 holds its whole 16-bit model gathered at the end of forward.
    """
    if setup.world_size == 1 and setup.zero.offload_params == "none":
        return 0
    big = [t.numel for t in param_tensors(setup.model) if t.numel >= setup.zero.param_persistence_threshold]
    if not big:
        return 0
    return min(sum(big), max(max(big), setup.zero.max_live_parameters + setup.zero.prefetch_bucket_size))


def stage3_states(setup: TrainingSetup, device: Device = "cuda") -> ModelStates:
    """Stage 3, per rank.

    * params: ``fp16_partitioned_groups_flat`` (b P3, ``_create_fp16_partitions_with_defragmentation``), plus the
      persistent parameters (numel < ``stage3_param_persistence_threshold``) held whole on every rank, padded:
      b * ceil(n/N) * N each (parameter_offload.py ``mark_persistent_parameters``). With ``offload_param`` the
      partitions live on the host; persistent parameters stay on the GPU.
    * master: ``fp32_partitioned_groups_flat`` (``_create_fp32_partitions``), 4 P3.
    * states: S * 4 P3, at the first step.
    * resident: ``grad_partitions_flat_buffer`` (b P3, ``gradient_accumulation_dtype`` = the model dtype by
      default) and one ipg bucket (b B_r, not doubled by overlap_comm), both allocated in
      ``_setup_for_real_optimizer`` at init and kept.
    * step: per sub-group of g = min(P3, sub_group_size) elements, ``_prepare_fp32_grad_for_sub_group`` flattens
      the 16-bit gradients (bg) and converts them to fp32 (4g) at once, then the optimizer's temporaries.
    * offload: master, its fp32 gradient (4 P3, from init: ``initialize_optimizer_states``), states and the
      gradient buffer on the host; NVMe takes the optimizer side (``offload_optimizer.device: nvme``) and/or the
      parameter partitions (``offload_param.device: nvme``). With ``pin_memory`` the fp32 gradient of each
      sub-group (``subgroup_gradient_buffer``), ``grad_partitions_flat_buffer`` and the host parameter flat buffer
      (``param_groups_fp16_flat_cpu_memory``) are page-locked, each rounded up to a power of two
      (``model_states.pinned_bytes``); master and states are pageable (``_create_fp32_partitions``: ``.clone()``).
      With ``offload_param`` on the CPU each parameter's partition is first pinned on its own
      (partition_parameters.py ``_partition_param``: ``get_accelerator().pin_memory(partitioned_tensor)``), sum of
      pin(b ceil(n_i / N)), and stays held after the copy into the flat buffer (measured: qwen2.5-0.5b N_d 1,
      1.77 GiB of host RSS beyond the other terms and the process baseline against 1.73 GiB of this sum;
      pythia-1b N_d 1: 2.07 vs 2.13; N_d 8: 0.30 vs 0.27; data/runs/h100-default).
    """
    b = DTYPE_BYTES[setup.dtype]
    world = setup.world_size
    tensors = param_tensors(setup.model)
    threshold = setup.zero.param_persistence_threshold
    p3 = sum(partition_numel(t.numel, world) for t in tensors)
    persistent = sum(partition_numel(t.numel, world) * world for t in tensors if t.numel < threshold)
    offload_opt = setup.zero.offload_optimizer != "none"
    offload_params = setup.zero.offload_params != "none"
    group = min(p3, setup.zero.sub_group_size) if setup.zero.sub_group_size else p3
    master = FP32 * p3
    states = optimizer_state_bytes(setup, p3)
    bucket = b * setup.zero.reduce_bucket_size if setup.zero.contiguous_gradients else 0
    grad_buffer = b * p3
    pinned = setup.zero.pin_memory and device == "cuda"
    groups = [group] * (p3 // group) + ([p3 % group] if p3 % group else []) if group else []
    fp32_grads = sum(pinned_bytes(FP32 * g, pinned) for g in groups)
    optimizer_side = master + states + fp32_grads + pinned_bytes(grad_buffer, pinned)
    host = (optimizer_side if setup.zero.offload_optimizer == "cpu" else 0)
    if setup.zero.offload_params == "cpu":
        host += pinned_bytes(b * p3, pinned)
        host += sum(pinned_bytes(b * partition_numel(t.numel, world), pinned) for t in tensors) if pinned else 0
    nvme = (master + states if setup.zero.offload_optimizer == "nvme" else 0)
    nvme += b * p3 if setup.zero.offload_params == "nvme" else 0
    if setup.zero.offload_optimizer == "nvme":
        host += FP32 * p3 + grad_buffer
    resident = bucket + (0 if offload_opt else grad_buffer)
    params = b * persistent + (0 if offload_params else b * p3)
    step_temp = 0 if offload_opt else max((b + FP32) * group,
                                          FP32 * group + optimizer_temp_bytes(setup, (group,), device))
    loaded = b * sum(t.numel for t in tensors)
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
        epilogue_bytes=0,
        step_grads_bytes=0,
        step_temp_bytes=step_temp,
        # init: the whole model while its partitions are made (not under zero.Init), or the steady buffers plus
        # the largest parameter gathered whole once (measured: data/probe/llama_z3_bf16_n4_g1*.json)
        init_peak_bytes=max(0 if setup.zero.builds_partitioned else loaded + b * p3,
                            b * p3 + (0 if offload_opt else master) + resident + b * n_max),
        host_bytes=host,
        host_pageable_bytes=master + states if setup.zero.offload_optimizer == "cpu" else 0,
        nvme_bytes=nvme,
    )

"""Stage 3 model states: runtime/zero/stage3.py ``DeepSpeedZeroOptimizer_Stage3`` and partition_parameters.py.

Same notation as ``estimator.model_states``. Stage 3 partitions every parameter separately: a parameter of n
elements keeps ``ceil(n / N)`` elements on each rank (partition_parameters.py ``_partition_param``, padding from
``_padding_size``), so P3 = sum over parameters of ceil(n / N).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import accumulate

from zeroest.estimator.core.architecture import ParamTensor, param_tensors
from zeroest.estimator.core.model_states import (
    FP32,
    Device,
    ModelStates,
    optimizer_state_bytes,
    optimizer_temp_bytes,
    pinned_bytes,
)
from zeroest.estimator.core.setup import DTYPE_BYTES, TrainingSetup
from zeroest.estimator.core.vocab import MAX_REUSE_DISTANCE
from zeroest.estimator.units import ceil_div


def partition_numel(numel: int, world_size: int) -> int:
    """Elements of one parameter held per rank: ceil(n / N) (partition_parameters.py ``_partition_param``)."""
    return ceil_div(numel, world_size)


_LAYER = re.compile(r"\.(?:layers|h|layer|blocks)\.(\d+)\.")


Trace = list[tuple[tuple[str, ...], int]]


def _module_trace(tensors: Sequence[ParamTensor], *, tied: bool, grad_ckpt: bool) -> tuple[Trace, Trace]:
    """The modules with parameters in the order stage 3's coordinator sees them in one forward, and in the backward
    after it, each as (its parameters' names, their numel).

    parameter_offload.py ``_register_deepspeed_module`` hooks every module; ``fetch_sub_module`` records each module
    as its forward, then its backward, begins (``record_module``). A module is the parameter name's prefix, in
    ``named_parameters`` order; a tied lm_head uses the token embedding's weight again after the last module.
    Backward runs the blocks in reverse; with non-reentrant checkpointing a decoder layer's backward begins with
    its recomputed forward (torch/utils/checkpoint.py ``_checkpoint_hook`` unpacks by re-running the layer, whose
    forward hooks fetch again).
    """
    modules: dict[str, list[ParamTensor]] = {}
    for t in tensors:
        modules.setdefault(t.name.rsplit(".", 1)[0], []).append(t)
    entries = [(tuple(t.name for t in ts), sum(t.numel for t in ts)) for ts in modules.values()]
    layers = [_LAYER.search(name + ".") for name in modules]
    keys = [m.group(1) if m else None for m in layers]
    if tied:
        embedding = next((t for t in tensors if t.component == "embeddings"), None)
        if embedding is not None:
            entries.append(((embedding.name,), embedding.numel))
            keys.append(None)
    blocks: list[tuple[str | None, Trace]] = []
    for i, (entry, key) in enumerate(zip(entries, keys, strict=True)):
        if key is None or i == 0 or key != keys[i - 1]:
            blocks.append((key, []))
        blocks[-1][1].append(entry)
    backward = [e for key, block in reversed(blocks) for e in (block if grad_ckpt and key else []) + block[::-1]]
    return entries, backward


def reuse_retained_numel(tensors: Sequence[ParamTensor], *, tied: bool, grad_ckpt: bool,
                         persistence_threshold: int, reuse_distance: int = MAX_REUSE_DISTANCE) -> int:
    """Elements of non-persistent parameters still gathered when forward ends because their next use is near.

    partitioned_param_coordinator.py ``release_sub_module`` (forward) frees only the parameters that
    ``__params_to_release`` picks: walking the recorded module trace from the next module on, it keeps every
    parameter met before the walked modules' parameters add up to ``stage3_max_reuse_distance`` R (1e9 by
    default). A parameter used last in forward at trace position k and next at k' stays gathered when
    sum_{k < j < k'} n_j < R (n_j: elements of module j's own parameters, persistent ones included). The lm_head
    (last in forward, first in backward) always stays; without checkpointing a module's distance is about twice the
    elements after it, so the last ~R/2 elements of the model stay gathered into backward. Nothing here caps them
    at ``stage3_max_live_parameters``: that bounds only the prefetch.
    """
    forward, backward = _module_trace(tensors, tied=tied, grad_ckpt=grad_ckpt)
    trace, n_forward = forward + backward, len(forward)
    numel = {t.name: t.numel for t in tensors}
    starts = [0, *accumulate(n for _, n in trace)]
    last_forward: dict[str, int] = {}
    for k, (names, _) in enumerate(trace[:n_forward]):
        for name in names:
            last_forward[name] = k
    next_use: dict[str, int] = {}
    for k in range(len(trace) - 1, n_forward - 1, -1):
        for name in trace[k][0]:
            next_use[name] = k
    return sum(numel[name] for name, k in last_forward.items()
               if numel[name] >= persistence_threshold and name in next_use
               and starts[next_use[name]] - starts[k + 1] < reuse_distance)


def gathered_numel(setup: TrainingSetup) -> int:
    """Elements held gathered whole at the end of a steady-state forward and into backward.

    partitioned_param_coordinator.py: in the first step DeepSpeed records the module trace and releases each module's
    parameters after use. From the second step on, ``fetch_sub_module`` prefetches ahead of use while fewer than
    ``stage3_max_live_parameters`` L elements are gathered (``__n_available_params``), up to
    ``stage3_prefetch_bucket_size`` B at a time, and a prefetched parameter is not released before its use: about
    L + B elements stay gathered (at least the largest tensor). Independently, ``release_sub_module`` keeps the
    parameters whose next use lies within ``stage3_max_reuse_distance`` (``reuse_retained_numel``), so with a
    small L the end of forward holds those instead. Persistent parameters are whole anyway and not counted again.
    With N_d = 1 and no parameter offload a "gathered" parameter is its own partition: nothing extra. Measured on
    an H100 (data/runs/h100-default): pythia-1b N_d = 2 holds its whole 16-bit model gathered at the end of
    forward; gpt2-large N_d = 4 with L = 1e8 holds 5.2e8 elements (1.04e9 bytes more in step 1's forward than in
    step 0's, beyond the optimizer states; data/runs/h100-holdout).
    """
    if setup.world_size == 1 and setup.zero.offload_params == "none":
        return 0
    tensors = param_tensors(setup.model)
    big = [t.numel for t in tensors if t.numel >= setup.zero.param_persistence_threshold]
    if not big:
        return 0
    retained = reuse_retained_numel(tensors, tied=setup.model.tied_embeddings, grad_ckpt=setup.workload.grad_ckpt,
                                    persistence_threshold=setup.zero.param_persistence_threshold)
    return min(sum(big), max(max(big), setup.zero.max_live_parameters + setup.zero.prefetch_bucket_size, retained))


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
    tensors = param_tensors(setup.model)
    b = DTYPE_BYTES[setup.dtype]
    first = 0 if setup.zero.offload_params != "none" else b * partition_numel(tensors[0].numel, setup.world_size)
    return b * sum(t.numel for t in tensors) + first


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
        # init: the whole model while its partitions are made (not under zero.Init; ``convert_peak_bytes``), or
        # the steady buffers plus the largest parameter gathered whole once (data/probe/llama_z3_bf16_n4_g1*.json)
        init_peak_bytes=max(0 if setup.zero.builds_partitioned else convert_peak_bytes(setup),
                            b * p3 + (0 if offload_opt else master) + resident + b * n_max),
        host_bytes=host,
        host_pageable_bytes=master + states if setup.zero.offload_optimizer == "cpu" else 0,
        nvme_bytes=nvme,
    )

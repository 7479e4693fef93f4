"""Model states per rank: what DeepSpeed 0.19 really allocates for parameters, gradients and optimizer states.

Notation inside formulas: P parameters, N = N_d ranks, b bytes of the training dtype (2, or 4 in fp32 training),
P' the flat group padded to a multiple of 2N, p = P'/N the partition, B_r ``reduce_bucket_size``, n_max the largest
parameter tensor, S fp32 optimizer states per parameter (2 for Adam). With frozen parameters (LoRA, ``--freeze``,
``core.adapters``) P = P_t + P_f: P_t trainable (``requires_grad``), P_f frozen; every optimizer-side term (flat
group, master, states, gradients, P', p, n_max) counts P_t only, because every DeepSpeed wrapper keeps only
``utils.py is_optimized_parameter`` parameters (``requires_grad`` and numel > 0) of the optimizer's param groups,
frozen ones included by the user or not; a frozen parameter stays the model's own 16-bit tensor.

Every term names the DeepSpeed file and function that allocates it; docs/DEEPSPEED_ALLOCATIONS.md has the measured
catalogue behind them (real DeepSpeed 0.19.8 on CPU, every byte attributed).

The result is split by *when* a buffer lives, because a sum of components is not a peak: ``estimator.timeline``
combines these with activations per phase.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from zeroest.estimator.core.adapters import TrainableSplit, trainable_split
from zeroest.estimator.core.architecture import param_tensors
from zeroest.estimator.core.flat_group import (  # noqa: F401 - re-exported: capacity.py and tests import them from here
    NCCL_START_ALIGNMENT_FACTOR,
    _overlap_numel,
    flat_group_numel,
    largest_slice_numel,
    stage1_offload_norm_excess_bytes,
    stage1_partition_copy_bytes,
)
from zeroest.estimator.core.optimizers import flat_at_stage0, optimizer_temp_bytes, state_bytes
from zeroest.estimator.core.setup import DTYPE_BYTES, TrainingSetup, ZeroStage
from zeroest.estimator.core.shape import ModelShape

FP32 = 4
FP64 = 8
Device = Literal["cuda", "cpu"]


@dataclass(frozen=True, kw_only=True)
class ModelStates:
    """Bytes one rank holds for model states, by buffer and lifetime (on the GPU unless named host/nvme)."""

    params_bytes: int
    """16-bit parameters (fp32 in fp32 training) resident from init: the flat buffer, or stage 3's partitions
    plus its persistent parameters held whole."""
    master_weights_bytes: int
    """fp32 master weights on the GPU (0 when offloaded, or in fp32 training without a ZeRO wrapper)."""
    optimizer_states_bytes: int
    """Optimizer states on the GPU once they exist."""
    states_at_init: bool
    """True where the wrapper creates the states inside ``deepspeed.initialize`` (stage 0's FP16 optimizers run one
    step on zero gradients in ``initialize_optimizer_states``); False where the first ``step`` does (ZeRO)."""
    grads_bytes: int
    """Gradient storage at the end of backward (until the step frees it)."""
    grads_carry_bytes: int
    """Gradient storage held between micro-steps with gradient accumulation (G > 1), before a backward starts
    (at stage 1 the reduce buckets stay allocated too)."""
    buckets_bytes: int
    """Reduce buckets live during backward (stages 1-2: from the first gradient hook to the end of backward)."""
    resident_buffers_bytes: int
    """Buffers allocated at init and kept for the whole run (stage 3's gradient partition buffer and ipg bucket;
    the offload path's GPU staging buffer)."""
    gathered_params_bytes: int
    """Stage 3: parameters gathered at once during forward/backward (current module plus prefetch)."""
    recompute_gathered_bytes: int = 0
    """Stage 3 with gradient checkpointing and frozen parameters: gathered beyond ``gathered_params_bytes`` during a
    layer's backward (the recompute's frozen weights, ``stage3.recompute_gathered_numel``)."""
    epilogue_bytes: int
    """Transient at the end of backward: the 16-bit partition stage 1 flattens from the full gradients; with
    offload, the fp32 copy of the largest in-partition gradient slice on its way to the host."""
    step_grads_bytes: int
    """Gradient storage alive when ``engine.step()`` begins (freed inside it, after its fp32 copy is made)."""
    step_temp_bytes: int
    """Transient inside ``engine.step()``, beyond the above: fp32 gradient copies and optimizer temporaries."""
    init_peak_bytes: int
    """Peak of ``deepspeed.initialize`` with the model already on the GPU, all buffers included."""
    host_bytes: int
    """Host RAM per rank: offloaded master weights, optimizer states, pinned gradient and parameter buffers."""
    host_pageable_bytes: int = 0
    """Of ``host_bytes``, what is pageable (the CPU optimizer's states, stage 3's fp32 master); the rest are the
    buffers DeepSpeed page-locks with ``pin_memory`` (``pinned_bytes``)."""
    nvme_bytes: int
    """Bytes per rank swapped to NVMe (ZeRO-Infinity)."""

    @property
    def steady_bytes(self) -> int:
        """Held outside backward and step once states exist: params, master, states, resident buffers."""
        return self.params_bytes + self.master_weights_bytes + self.optimizer_states_bytes + self.resident_buffers_bytes


def pinned_bytes(nbytes: int, pinned: bool) -> int:
    """Host bytes one buffer of ``nbytes`` takes: page-locked, the next power of two; pageable, ``nbytes``.

    DeepSpeed pins through ``tensor.pin_memory()`` (deepspeed/accelerator/abstract_accelerator.py ``pin_memory``,
    the torch backend unless ``DS_PIN_MEMORY_BACKEND=native``), which allocates from torch's host caching allocator:
    aten/src/ATen/core/CachingHostAllocator.h ``allocate`` asks ``cudaHostAlloc`` for
    ``c10::llvm::PowerOf2Ceil(size)`` bytes, all resident. A 2.9 GiB fp32 partition takes 4 GiB of host RAM.
    """
    return 1 << (nbytes - 1).bit_length() if pinned and nbytes > 0 else nbytes


def trained(setup: TrainingSetup) -> TrainableSplit:
    """The setup's parameters split into trainable and frozen (``core.adapters.trainable_split``); a full fine-tune
    has every parameter trainable, in ``named_parameters`` order."""
    return trainable_split(setup.model, setup.adapters)


def _numels(model: ModelShape | TrainableSplit) -> tuple[int, ...]:
    """Trainable tensor sizes in order: every parameter of a bare shape, the trainable ones of a split."""
    if isinstance(model, TrainableSplit):
        return tuple(t.numel for t in model.trainable)
    return tuple(t.numel for t in param_tensors(model))


def stage2_grad_numel(model: ModelShape | TrainableSplit, world_size: int, rank: int | None = None) -> int:
    """Elements of ``grads_in_partition`` on ``rank`` (None: the rank that holds most).

    stage_1_and_2.py ``copy_grads_in_partition`` sizes the buffer as the sum of ``numel`` of every parameter in
    ``params_in_partition`` (``get_partition_info``: any parameter that overlaps the rank's slice of the flat
    group, counted whole). Rank r owns [r p, (r + 1) p) of the flat group, in ``named_parameters`` order. The flat
    group holds the trainable parameters only (``bit16_groups``), so a split counts its trainable tensors.
    """
    numels = _numels(model)
    ranks = range(world_size) if rank is None else (rank,)
    return max(_overlap_numel(numels, world_size, r) for r in ranks)


def stage1_offload_grads_bytes(setup: TrainingSetup, numel: int) -> int:
    """Stage 1 with optimizer offload and ``overlap_comm`` off: the model's ``param.grad`` (bP_t) live to the end of
    backward, as without offload; 0 at stage 2 or with ``overlap_comm``.

    stage_1_and_2.py ``process_gradients`` (the gradient hook) reduces a gradient only
    ``if self.partition_gradients or self.overlap_comm``: at stage 1 with overlap off no hook reduces or offloads
    anything; every ``param.grad`` stays on the GPU until ``engine.backward`` calls ``reduce_gradients``, which
    walks the groups (``reduce_ready_partitions_and_remove_grads``) and then copies this rank's partition to the
    host (``copy_grads_in_partition`` -> ``async_inplace_copy_grad_to_fp32_buffer_from_gpu``). The reduce buckets
    are allocated by the first hook all the same (``setup_buckets``). Measured: qwen2.5-1.5b, N_d = 2, ZeRO-1 +
    offload + checkpointing, backward 8.06 GiB against 6.05 at ZeRO-2 (data/runs/h200-cards).
    """
    if setup.stage >= ZeroStage.GRADIENTS or setup.zero.overlap:
        return 0
    return DTYPE_BYTES[setup.dtype] * numel


def offload_copy_temp_bytes(model: ModelShape | TrainableSplit, world_size: int) -> int:
    """8 * n_slice: the fp64 copy on the GPU of one gradient's in-partition slice, made for its norm on the way to
    the host.

    stage_1_and_2.py ``copy_grads_in_partition`` with ``cpu_offload``, per parameter at the accumulation boundary:
    ``set_norm_for_param_grad_in_gpu`` takes ``grad.view(-1).narrow(0, source_offset, num_elements)`` and computes
    ``.to(get_norm_dtype()).norm(2)``, where ``zero/utils.py get_norm_dtype`` is ``torch.double`` on every device
    with fp64 (8 bytes an element); that copy is freed before ``async_inplace_copy_grad_to_fp32_buffer_from_gpu``
    converts the same slice to fp32 (4 n_slice) for ``dest_tensor.copy_``; ``update_offload_overflow_tracker``
    reduces without a copy (runtime/utils.py ``has_inf_or_nan``). n_slice is the largest overlap of one parameter
    with the rank's partition (the embedding, whole, on rank 0 of a small N_d). Measured on the H200: qwen2.5-1.5b,
    N_d = 2, ZeRO-2 + offload + checkpointing, the allocator's history at the backward peak holds one 1780.5 MiB
    block allocated in ``set_norm_for_param_grad_in_gpu`` (8 x 151936 x 1536) beside the reduce bucket and the
    states (data/runs/h200-snapshots/cards13-backward.json); llama-3-8b, N_d = 2, ZeRO-2 + offload on a 24 GB card
    OOMs asking for 3.91 GiB (8 x 128256 x 4096, data/runs/h200-cards). Trainable tensors only (the flat group's).
    """
    numels = _numels(model)
    return FP64 * max(largest_slice_numel(numels, world_size, r) for r in range(world_size))


def shared_grads_through_step(setup: TrainingSetup) -> bool:
    """Stages 1-2 (no offload) with several parameter groups: the 16-bit gradient partition lives through the
    optimizer step of every group but the last.

    stage_1_and_2.py ``step`` walks the groups one by one: ``free_grad_in_param_list(self.params_in_partition[i])``,
    the fp32 copy of group i's gradients, ``_optimizer_step(i)``. The gradients are views of buffers that span the
    groups: at stage 2 ``copy_grads_in_partition`` makes one ``grads_in_partition`` buffer for the parameters in
    partition of every group (``_release_ipg_buffers`` drops the optimizer's own reference at the end of backward,
    so the storage lives while any view does); at stage 1 ``independent_gradient_partition_epilogue`` builds each
    group's ``averaged_gradients`` from ``all_grad_tensors``, the reduced gradients in the shared ipg buffers. So
    while a later group still holds its views, the whole gradient partition (``step_grads_bytes``) stays under
    group i's step: with G >= 2 groups under every step but the last, the small no-decay group in the usual
    grouping. Measured on the CPU against real DeepSpeed through the probe (tests/test_timeline_cpu.py, llama,
    N_d = 2, two groups): the step's peak is b p above the one-group formula at stages 1 and 2; and with torch
    AdamW as a client optimizer (llama, 3.2M parameters, N_d = 1, stage 2): 12 Psi above the step's start with
    two groups, 10 Psi with one.
    """
    return (setup.stage in (ZeroStage.OPTIMIZER_STATES, ZeroStage.GRADIENTS)
            and setup.zero.offload_optimizer == "none" and setup.optimizer.param_groups > 1
            and _no_decay_group_trains(setup))


def _no_decay_group_trains(setup: TrainingSetup) -> bool:
    """The second group (no weight decay: biases and norm weights, trainer.py ``get_decay_parameter_names``) holds
    a trainable tensor. LoRA adapters (peft's bias "none") have neither, so a Trainer's LoRA job passes an empty
    second group and steps its one real group with nothing left to hold the gradients."""
    if setup.adapters.full:
        return True  # every causal LM has norm weights
    return any(t.component == "norms" or t.name.endswith("bias")
               for t in trained(setup).trainable)


def stage0_states(setup: TrainingSetup, split: TrainableSplit, device: Device = "cuda") -> ModelStates:
    """Stage 0: every rank holds every state (engine.py ``_do_optimizer_sanity_check`` picks the wrapper).

    * fp32: the bare optimizer; grads 4P_t (autograd fills ``param.grad`` of trainable parameters only) until
      ``zero_grad``; states 8P_t at the first step (torch/optim/adamw.py ``_init_group`` skips parameters whose
      ``grad`` is None, so frozen parameters in the param groups get no state).
    * bf16/fp16 with FusedAdam: runtime/fp16/fused_optimizer.py ``FP16_Optimizer.__init__``: the trainable params
      (``is_optimized_parameter``) re-pointed into a flat 16-bit buffer (bP_t, beside the model's bP while
      flattening), a flat fp32 master (4P_t), states created at init by ``initialize_optimizer_states`` (a zero fp32
      gradient 4P_t and one step); in ``step`` every 16-bit gradient is converted to fp32 and flattened
      (4P_t + 4P_t at once) while the 16-bit gradients (bP_t) still exist.
    * bf16/fp16 with any other optimizer (torch AdamW, FusedLion, Muon, bitsandbytes, Adafactor):
      runtime/fp16/unfused_optimizer.py ``FP16_UnfusedOptimizer.__init__``: the
      model's own params, an fp32 master per trainable parameter (4P_t, ``clone().float()``), states at init (one
      step on zero gradients: bP_t + 4P_t zero grads), in ``step`` an fp32 copy of every gradient (4P_t).
    * frozen parameters: the model's own 16-bit tensors (bP_f), nothing else.
    """
    b = DTYPE_BYTES[setup.dtype]
    numel, trainable = split.total_numel, split.trainable_numel
    states = state_bytes(setup, trainable)
    temps = optimizer_temp_bytes(setup, _numels(split), device)
    common = dict(grads_bytes=b * trainable, step_grads_bytes=b * trainable, buckets_bytes=0,
                  resident_buffers_bytes=0, gathered_params_bytes=0, epilogue_bytes=0, host_bytes=0, nvme_bytes=0,
                  grads_carry_bytes=b * trainable if setup.workload.grad_accum > 1 else 0)
    if setup.dtype == "fp32":
        return ModelStates(params_bytes=b * numel, master_weights_bytes=0, optimizer_states_bytes=states,
                           states_at_init=False, step_temp_bytes=temps, init_peak_bytes=b * numel, **common)
    steady = b * numel + FP32 * trainable + states
    if flat_at_stage0(setup):
        step_temp = 2 * FP32 * trainable
        init_peak = max(b * numel + b * trainable, steady + FP32 * trainable)
    else:
        step_temp = FP32 * trainable + temps
        init_peak = steady + (b + FP32) * trainable + temps
    return ModelStates(params_bytes=b * numel, master_weights_bytes=FP32 * trainable, optimizer_states_bytes=states,
                       states_at_init=True, step_temp_bytes=step_temp, init_peak_bytes=init_peak, **common)


def offload_host_bytes(setup: TrainingSetup, part: int, n_max: int, device: Device = "cuda") -> int:
    """Host RAM of stage 1-2 optimizer offload per rank (runtime/zero/stage_1_and_2.py).

    H = pin(4p) + S * 4p + pin(4p) + pin(bp) + pin(b n_max) + G_acc

    * pin(4p): ``single_partition_of_fp32_groups`` (the master partition, ``get_accelerator().pin_memory``);
    * S * 4p: DeepSpeedCPUAdam's exp_avg and exp_avg_sq (``torch.zeros_like`` on the host: pageable);
    * pin(4p): its ``.grad``, ``single_grad_partition`` (``initialize_optimizer_states``);
    * pin(bp): ``param_buffer_of_bit16_for_cpu_offload_groups``; pin(b n_max): ``temp_grad_buffer_for_cpu_offload``;
    * G_acc, with gradient accumulation only: ``accumulated_grads_in_cpu``, one pinned b * n_i buffer per
      parameter i of this rank's partition (``async_accumulate_grad_in_cpu_via_gpu``), sum of pin(b n_i).

    ``pin`` is ``pinned_bytes``: a power of two with ``pin_memory`` on a GPU; on the CPU DeepSpeed pins nothing
    (accelerator/cpu_accelerator.py ``pin_memory`` is a no-op).
    """
    b = DTYPE_BYTES[setup.dtype]
    pinned = setup.zero.pin_memory and device == "cuda"
    held = (pinned_bytes(FP32 * part, pinned) + state_bytes(setup, part) + pinned_bytes(FP32 * part, pinned)
            + pinned_bytes(b * part, pinned) + pinned_bytes(b * n_max, pinned))
    if setup.workload.grad_accum > 1:
        mine = _partition_params(_numels(trained(setup)), setup.world_size, 0)  # trainable tensors: the flat group
        held += sum(pinned_bytes(b * n, pinned) for n in mine)
    return held


def _partition_params(numels: tuple[int, ...], world_size: int, rank: int) -> tuple[int, ...]:
    """Sizes of the parameters (in flat-group order) that overlap ``rank``'s partition of the padded group."""
    part = flat_group_numel(sum(numels), world_size) // world_size
    lo, hi = rank * part, (rank + 1) * part
    out, start = [], 0
    for n in numels:
        if start < hi and start + n > lo:
            out.append(n)
        start += n
    return tuple(out)


def stage12_states(setup: TrainingSetup, split: TrainableSplit, device: Device = "cuda", *,
                   flatten_on_gpu: bool = True) -> ModelStates:
    """Stages 1 and 2: runtime/zero/stage_1_and_2.py ``DeepSpeedZeroOptimizer``. P, P', p, n_max below are the
    trainable parameters' (P_t): ``__init__`` builds ``bit16_groups`` from the param groups' parameters that pass
    ``is_optimized_parameter`` (``requires_grad``), and only those are flattened, partitioned, hooked and updated.
    Frozen parameters stay the model's own 16-bit tensors, whole on every rank: params hold bP_f more.

    * params: ``bit16_groups_flat``, bP'; the model's parameters become views into it
      (``_update_model_bit16_weights``), so init peaks at bP + bP' while both exist, or at bP' when the card
      lacks room and DeepSpeed flattens on the host (``flatten_on_gpu`` False, ``core.capacity``).
    * master: ``single_partition_of_fp32_groups``, 4p (``weights_partition ... .clone()``).
    * states: S * 4p, at the first step (``initialize_optimizer_states`` creates none).
    * buckets: ``setup_buckets`` allocates b * B_r whole (x2 with overlap_comm) at the first gradient hook of each
      backward, freed by ``_release_ipg_buffers`` at its end; stage 1 keeps them between micro-steps (G > 1).
    * grads, stage 1: the model's ``param.grad`` (bP) until the end of backward, where ``reduce_gradients`` moves
      them through the bucket into ``grads_in_partition`` (``stage1_partition_copy_bytes``; with ``overlap_comm``
      still charged as the flattened partition, bp); stage 2:
      ``grads_in_partition``, b * (whole parameters overlapping the partition) (``copy_grads_in_partition``),
      reused across micro-steps.
    * step: the flat 16-bit partition is converted to an fp32 ``single_grad_partition`` (4p) and freed; then the
      optimizer's temporaries.
    * offload: master, states, an fp32 gradient partition (4p, from init) and a 16-bit copy (bp) on the host
      (master, gradient partition, 16-bit copy and the b * n_max gradient staging buffer page-locked with
      ``pin_memory``, each rounded up to a power of two: ``pinned_bytes``; the states are pageable);
      ``temp_grad_buffer_for_gpu_offload`` (b * n_max) on the GPU; no ``grads_in_partition``; at stage 1 without
      ``overlap_comm`` the model's gradients (bP) stay to the end of backward (``stage1_offload_grads_bytes``).
    """
    b = DTYPE_BYTES[setup.dtype]
    world = setup.world_size
    numel, frozen = split.trainable_numel, split.frozen_numel
    padded = flat_group_numel(numel, world)
    part = padded // world
    offload = setup.zero.offload_optimizer != "none"
    stage2 = setup.stage >= ZeroStage.GRADIENTS
    accum = setup.workload.grad_accum > 1
    n_max = max(_numels(split))
    n_buckets = 2 if setup.zero.overlap else 1
    buckets = n_buckets * b * setup.zero.reduce_bucket_size if setup.zero.contiguous_gradients else 0
    master = FP32 * part
    states = state_bytes(setup, part)
    if offload:
        grads = stage1_offload_grads_bytes(setup, numel)
        # the norm copy at the boundary; at stage 1 without overlap the held gradients move into the bucket first
        epilogue = (stage1_offload_norm_excess_bytes(setup, _numels(split), FP64) if grads
                    else offload_copy_temp_bytes(split, world))
        carry, step_grads = (grads if accum else 0), 0
    elif stage2:
        grads = b * stage2_grad_numel(split, world)
        carry, epilogue, step_grads = (grads if accum else 0), 0, grads
    else:
        epilogue = b * part if setup.zero.overlap else stage1_partition_copy_bytes(setup, _numels(split))
        grads, step_grads = b * numel, b * part
        carry = grads if accum else 0  # the buckets stay too: estimator.timeline adds them at stage 1
    temps = optimizer_temp_bytes(setup, (part,), device)
    # step: flatten the partition (bp) and convert it (4p) while the gradients live; then free them and update.
    # At stage 2 every group's gradients are views of one ``grads_in_partition`` buffer, so with several groups
    # it outlives the steps of all groups but the last (``shared_grads_through_step``).
    freed = 0 if shared_grads_through_step(setup) else step_grads
    step_temp = 0 if offload else max(b * part + FP32 * part, FP32 * part + temps - freed)
    return ModelStates(
        params_bytes=b * padded + b * frozen,
        master_weights_bytes=0 if offload else master,
        optimizer_states_bytes=0 if offload else states,
        states_at_init=False,
        grads_bytes=grads,
        grads_carry_bytes=carry,
        buckets_bytes=buckets,
        resident_buffers_bytes=b * n_max if offload else 0,
        gathered_params_bytes=0,
        epilogue_bytes=epilogue,
        step_grads_bytes=step_grads,
        step_temp_bytes=step_temp,
        # init: the model's params and the flat copy (2bP; bP' alone when flattened on the host); later the master
        # partition and the zero fp32 gradient ``initialize_optimizer_states`` makes and drops (4p), or the pinned
        # host buffers with offload.
        # (offload: ``weights_partition = ...[partition_id].detach().clone().to(self.device)`` clones the 16-bit
        # partition on the GPU, bp, before moving it to the host)
        # frozen parameters (bP_f) stay where they are through all of it.
        init_peak_bytes=b * frozen + max(b * numel * flatten_on_gpu + b * padded,
                                         b * padded + (b * part if offload else master + FP32 * part)),
        host_bytes=offload_host_bytes(setup, part, n_max, device) if offload else 0,
        host_pageable_bytes=states if offload else 0,
        nvme_bytes=0,
    )

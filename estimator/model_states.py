"""Model states per rank: what DeepSpeed 0.19 really allocates for parameters, gradients and optimizer states.

Notation inside formulas: P parameters, N = N_d ranks, b bytes per 16-bit value (4 for fp32 training), P_pad the flat
group padded by DeepSpeed, S the optimizer's fp32 states per parameter (2 for Adam). Every term names the DeepSpeed
file and function that allocates it; docs/DEEPSPEED_ALLOCATIONS.md has the measured catalogue behind them.

The result is split by *when* a buffer lives, because a sum of components is not a peak:
``persistent`` buffers live from init to the end, ``backward`` ones from the first gradient to the step, ``step``
ones only inside ``engine.step()``. ``estimator.timeline`` combines them with activations per phase.
"""

from __future__ import annotations

from dataclasses import dataclass

from .architecture import param_tensors
from .setup import DTYPE_BYTES, TrainingSetup, ZeroStage
from .units import ceil_div, round_up

FP32 = 4
NCCL_START_ALIGNMENT_FACTOR = 2
"""Elements: stage_1_and_2.py ``DeepSpeedZeroOptimizer.__init__`` aligns flat partitions to 4 bytes of fp16."""


@dataclass(frozen=True, kw_only=True)
class ModelStates:
    """Bytes one rank holds for model states, by buffer and lifetime (GPU unless named host/nvme)."""

    params_bytes: int
    """16-bit parameters (fp32 in fp32 training) resident on the GPU: the flat buffer, a stage-3 partition plus the
    persistent parameters, or nothing when stage 3 offloads them."""
    master_weights_bytes: int
    """fp32 master weights on the GPU (0 when offloaded or in fp32 training without a wrapper)."""
    optimizer_states_bytes: int
    """Optimizer states on the GPU; created lazily at the first ``step`` (torch/FusedAdam ``step`` state init)."""
    grads_bytes: int
    """Gradient storage held from the end of backward until the step (16-bit unless said)."""
    buckets_bytes: int
    """Reduce buckets live during backward (ipg buffers, double with overlap_comm)."""
    gathered_params_bytes: int
    """Stage 3: parameters gathered at once during forward/backward (current module plus prefetch)."""
    step_temp_bytes: int
    """Transient inside ``engine.step()``: flattened fp32 gradient partition and the like."""
    optimizer_temp_bytes: int
    """Temporaries the optimizer kernel allocates during its update (torch foreach AdamW; 0 for FusedAdam)."""
    init_extra_bytes: int
    """Transient beyond params and master weights at the peak of ``deepspeed.initialize``: the model's own
    parameters while they are flattened, or the 16-bit clone a master copy is made from."""
    host_bytes: int
    """Host RAM per rank: offloaded master weights, optimizer states, pinned gradient and parameter buffers."""
    nvme_bytes: int
    """Bytes per rank swapped to NVMe (ZeRO-Infinity)."""

    @property
    def steady_bytes(self) -> int:
        """Buffers held outside of backward and step: params, master weights, optimizer states."""
        return self.params_bytes + self.master_weights_bytes + self.optimizer_states_bytes


def flat_group_numel(numel: int, world_size: int) -> int:
    """P_pad: the flat 16-bit group padded to a multiple of ``2 * N`` elements.

    stage_1_and_2.py ``DeepSpeedZeroOptimizer.__init__``: ``alignment = nccl_start_alignment_factor * dp_size`` and
    ``flatten_dense_tensors_aligned`` pads the group to that multiple (parameter_alignment is off by default).
    """
    return round_up(numel, NCCL_START_ALIGNMENT_FACTOR * world_size)


def _optimizer_state_bytes(setup: TrainingSetup, numel: int) -> int:
    """fp32 optimizer states for ``numel`` parameters: S * 4 * numel; Adafactor keeps row + column factors.

    torch/optim/adamw.py ``_init_group`` and deepspeed/ops/adam/fused_adam.py ``step``: exp_avg, exp_avg_sq fp32
    (``torch.zeros_like(p)`` of the fp32 master partition). Adafactor's factored second moment is about
    (rows + cols) per matrix; we charge 1% of one state as a documented approximation.
    """
    if setup.optimizer.name == "adafactor":
        return ceil_div(numel * FP32, 100)
    return setup.optimizer.states_per_param * FP32 * numel


def _foreach_temp_bytes(setup: TrainingSetup, numel: int) -> int:
    """torch's foreach AdamW (``torch_adam: true``) allocates temporaries as large as the group it updates.

    torch/optim/adamw.py ``_multi_tensor_adamw``: ``exp_avg_sq_sqrt = torch._foreach_sqrt(device_exp_avg_sqs)`` and
    the step-size list: about one fp32 value per parameter alive at once. FusedAdam (csrc/adam/multi_tensor_adam.cu)
    updates in place and allocates nothing.
    """
    if setup.optimizer.impl != "torch" or setup.optimizer.name in ("sgd",):
        return 0
    return FP32 * numel


def stage0_states(setup: TrainingSetup, numel: int) -> ModelStates:
    """Stage 0: every rank holds every state.

    engine.py ``_do_optimizer_sanity_check``: bf16/fp16 without ZeRO wraps the optimizer in FP16_Optimizer
    (runtime/fp16/fused_optimizer.py; ``DDP_BFLOAT16`` takes the same class), which keeps a flat fp32 master copy of
    all parameters (``fp32_groups_flat``, 4P) made at init, the model's own 16-bit ``param.grad`` (bP, kept from the
    first backward until ``zero_grad`` after the step), and inside ``step`` a flat fp32 gradient
    (``fp32_groups_flat[i].grad``, 4P) plus the flattened 16-bit gradients (bP) it is copied from.
    fp32 training runs the bare optimizer: grads 4P, no master copy, no step copy.
    """
    b = DTYPE_BYTES[setup.dtype]
    mixed = setup.dtype != "fp32"
    master = FP32 * numel if mixed else 0
    return ModelStates(
        params_bytes=b * numel,
        master_weights_bytes=master,
        optimizer_states_bytes=_optimizer_state_bytes(setup, numel),
        grads_bytes=b * numel,
        buckets_bytes=0,
        gathered_params_bytes=0,
        step_temp_bytes=(FP32 + b) * numel if mixed else 0,
        optimizer_temp_bytes=_foreach_temp_bytes(setup, numel),
        init_extra_bytes=b * numel if mixed else 0,
        host_bytes=0,
        nvme_bytes=0,
    )


def stage12_states(setup: TrainingSetup, numel: int) -> ModelStates:
    """Stages 1 and 2: runtime/zero/stage_1_and_2.py ``DeepSpeedZeroOptimizer``.

    * params: ``bit16_groups_flat``, b * P_pad; the model's parameters become views into it
      (``_update_model_bit16_weights``), so flattening costs b * P once at init (``flatten_dense_tensors_aligned``).
    * master: ``single_partition_of_fp32_groups``, 4 * P_pad / N (``weights_partition ... .clone()``).
    * optimizer states: S * 4 * P_pad / N, lazily at the first step.
    * grads, stage 1: the model's full ``param.grad`` (b * P) until ``reduce_gradients`` at the boundary; stage 2:
      ``grads_in_partition`` (b * P_pad / N, ``copy_grads_in_partition``) plus the ipg reduce bucket
      (``setup_buckets``: b * reduce_bucket_size, a second one with overlap_comm).
    * step: ``flat_grad_partition`` (b * P_pad / N) converted to fp32 ``single_grad_partition`` (4 * P_pad / N).
    * offload (``cpu_offload``): master and states on the host (pinned), fp32 grad partition
      ``single_partition_of_fp32_groups[i].grad`` on the host (``initialize_optimizer_states``), a pinned 16-bit
      copy ``param_buffer_of_bit16_for_cpu_offload_groups``; on the GPU ``temp_grad_buffer_for_gpu_offload`` of the
      largest parameter.
    """
    b = DTYPE_BYTES[setup.dtype]
    world = setup.world_size
    padded = flat_group_numel(numel, world)
    part = padded // world
    offload = setup.zero.offload_optimizer != "none"
    stage2 = setup.stage >= ZeroStage.GRADIENTS
    largest = max(t.numel for t in param_tensors(setup.model))
    if stage2:
        grads = b * part
        n_buckets = 2 if setup.zero.overlap else 1
        buckets = n_buckets * b * min(setup.zero.reduce_bucket_size, padded) if setup.zero.contiguous_gradients else 0
    else:
        grads, buckets = b * numel, 0
    master = FP32 * part
    states = _optimizer_state_bytes(setup, part)
    host = master + states + FP32 * part + b * part if offload else 0
    return ModelStates(
        params_bytes=b * padded,
        master_weights_bytes=0 if offload else master,
        optimizer_states_bytes=0 if offload else states,
        grads_bytes=grads,
        buckets_bytes=buckets + (b * largest if offload else 0),
        gathered_params_bytes=0,
        step_temp_bytes=0 if offload else (FP32 + b) * part,
        optimizer_temp_bytes=0 if offload else _foreach_temp_bytes(setup, part),
        init_extra_bytes=max(b * numel - (0 if offload else master), b * part),
        host_bytes=host,
        nvme_bytes=0,
    )

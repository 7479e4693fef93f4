"""Stage 3 model states: runtime/zero/stage3.py ``DeepSpeedZeroOptimizer_Stage3`` and partition_parameters.py.

Same notation as ``estimator.model_states``. Stage 3 partitions every parameter separately: a parameter of n
elements keeps ``ceil(n / N)`` elements on each rank (partition_parameters.py ``_partition_param``:
``partition_size = tensor_size // world_size`` rounded up, the last rank padded).
"""

from __future__ import annotations

from .architecture import param_tensors
from .model_states import FP32, ModelStates, _foreach_temp_bytes, _optimizer_state_bytes
from .setup import DTYPE_BYTES, TrainingSetup
from .units import ceil_div


def partition_numel(numel: int, world_size: int) -> int:
    """Elements of one parameter held per rank: ceil(n / N) (partition_parameters.py ``_partition_param``)."""
    return ceil_div(numel, world_size)


def stage3_states(setup: TrainingSetup) -> ModelStates:
    """Stage 3, per rank.

    * params: ``fp16_partitioned_groups_flat`` (b * sum ceil(n/N)), plus, whole on every rank, parameters with
      fewer than ``param_persistence_threshold`` elements (parameter_offload.py ``persistent_parameters``,
      ``ds_persist``). With ``offload_param`` the partitions live on the host; persistent ones stay on the GPU.
    * master: ``fp32_partitioned_groups_flat`` (``_create_fp32_partitions``), 4 * P/N; on the host when the
      optimizer is offloaded.
    * optimizer states: S * 4 * P/N, lazily at the first step.
    * grads: ``grad_partitions_flat_buffer`` (``_setup_for_real_optimizer``) of ``gradient_accumulation_dtype``
      (the model dtype by default): b * P/N, allocated at init and kept (pinned host memory with offload).
    * buckets: the ipg bucket ``bucket.buffer = torch.empty(reduce_bucket_size)`` per gradient dtype
      (``_setup_for_real_optimizer``), b * reduce_bucket_size, allocated at init, only with contiguous_gradients.
    * gathered: during forward and backward the current module's parameters are all-gathered whole, and
      ``stage3_prefetch_bucket_size`` elements ahead of use (partitioned_param_coordinator.py
      ``fetch_sub_module``), bounded by ``stage3_max_live_parameters``.
    * step: per sub-group of at most ``sub_group_size`` elements, ``_prepare_fp32_grad_for_sub_group`` flattens the
      averaged 16-bit gradients (b * g) and converts them to fp32 (4 * g).
    """
    b = DTYPE_BYTES[setup.dtype]
    world = setup.world_size
    tensors = param_tensors(setup.model)
    threshold = setup.zero.param_persistence_threshold
    part = sum(partition_numel(t.numel, world) for t in tensors)
    persistent = sum(t.numel for t in tensors if t.numel < threshold)
    largest = max(t.numel for t in tensors)
    offload_opt = setup.zero.offload_optimizer != "none"
    offload_params = setup.zero.offload_params != "none"
    sub_group = min(part, setup.zero.sub_group_size) if setup.zero.sub_group_size else part
    master = FP32 * part
    states = _optimizer_state_bytes(setup, part)
    grads = b * part
    live_limit = setup.zero.max_live_parameters or largest
    gathered = b * min(max(largest, live_limit), largest + setup.zero.prefetch_bucket_size)
    host = (master + states + FP32 * part if offload_opt else 0) + (b * part if offload_params else 0)
    nvme = 0
    if setup.zero.offload_optimizer == "nvme":
        nvme += master + states
        host -= master + states
    if setup.zero.offload_params == "nvme":
        nvme += b * part
        host -= b * part
    return ModelStates(
        params_bytes=b * persistent + (0 if offload_params else b * part),
        master_weights_bytes=0 if offload_opt else master,
        optimizer_states_bytes=0 if offload_opt else states,
        grads_bytes=0 if offload_opt else grads,
        buckets_bytes=b * setup.zero.reduce_bucket_size if setup.zero.contiguous_gradients else 0,
        gathered_params_bytes=gathered,
        step_temp_bytes=0 if offload_opt else (FP32 + b) * sub_group,
        optimizer_temp_bytes=0 if offload_opt else _foreach_temp_bytes(setup, sub_group),
        init_extra_bytes=b * sum(t.numel for t in tensors),  # the loaded model while it is partitioned
        host_bytes=host,
        nvme_bytes=nvme,
    )

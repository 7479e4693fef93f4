"""DeepSpeed's decisions that depend on the card: where stages 1-2 flatten a parameter group.

DeepSpeed 0.19.8 makes one such decision in the training runtime (the ``deepspeed/compile`` passes, which read
``total_memory()`` and ``available_memory()`` too, are not modelled: zeroest does not model compiled runs):

* runtime/zero/stage_1_and_2.py ``DeepSpeedZeroOptimizer.__init__``, per parameter group: ``empty_cache()``,
  then ``flatten_on_accelerator = available_memory() >= flat_buffer_bytes``. If so, the flat 16-bit buffer is
  built on the GPU next to the parameters it copies (2bP at init); if not, every parameter moves to the host
  (``param.cpu_data = param.data.cpu()``), the group is flattened there and the flat buffer alone is moved to the
  GPU (bP at init). ``flat_buffer_bytes`` is the padded group, b * P' (``parameter_alignment`` is off by default,
  runtime/zero/config.py, so no per-parameter padding).
* accelerator/cuda_accelerator.py ``available_memory``: NVML's ``free`` of the whole device (or, without pynvml,
  ``total_memory() - memory_allocated()``).

Stage 3 makes none: partition_parameters.py ``Init`` and stage3.py ``DeepSpeedZeroOptimizer_Stage3.__init__``
size every buffer from the config (buckets, ``sub_group_size``, prefetch) and never read free memory; offload's
pinned buffers are sized by the config and the model; the only ``empty_cache`` calls outside stage 1-2's
flatten are in ``offload_states`` and ``engine.empty_partition_cache``, which training does not call.

Free memory at the check, one rank alone on its card:

    F = M - C - N_c - round_up(b P, s)

M the card's total memory, C the CUDA context (``Overheads.cuda_context_bytes``), N_c the NCCL communicator of a
real process group (``Overheads.nccl_communicator_bytes``; 0 on a fake one), b P the model's 16-bit parameters the
engine has moved to the GPU (``engine._configure_distributed_model``), which the caching allocator still holds
after ``empty_cache`` (rounded to its segment size s, ``Overheads.reserved_block_bytes``). The group flattens on
the GPU iff F >= b P'. An unknown card (M None) is assumed large: the branch that holds more, 2bP.
"""

from __future__ import annotations

from dataclasses import dataclass

from zeroest.estimator.core.model_states import flat_group_numel
from zeroest.estimator.core.overheads import Overheads
from zeroest.estimator.core.setup import DTYPE_BYTES, TrainingSetup, ZeroStage
from zeroest.estimator.units import GiB, round_up


@dataclass(frozen=True, kw_only=True)
class FlattenDecision:
    """Where stages 1-2 flatten the parameter group, and the numbers DeepSpeed compares."""

    on_gpu: bool
    """True: flat copy built on the GPU beside the parameters (2bP at init); False: built on the host (bP)."""
    free_bytes: int | None
    """F, what ``available_memory()`` reports at the check; None for an unknown card."""
    flat_buffer_bytes: int
    """b P', the size DeepSpeed compares F with."""

    @property
    def assumed(self) -> bool:
        """The card was unknown and the larger branch was assumed."""
        return self.free_bytes is None


def free_at_flatten_bytes(setup: TrainingSetup, numel: int, overheads: Overheads, *, real_comm: bool) -> int | None:
    """F = M - C - N_c - round_up(b P, s) (module docstring); None when the setup names no card."""
    card = setup.gpu_memory_bytes
    if card is None:
        return None
    nccl = overheads.nccl_communicator_bytes if real_comm else 0
    held = round_up(DTYPE_BYTES[setup.dtype] * numel, max(1, overheads.reserved_block_bytes))
    return card - overheads.cuda_context_bytes - nccl - held


def flatten_decision(setup: TrainingSetup, numel: int, overheads: Overheads, *, real_comm: bool,
                     trainable_numel: int | None = None) -> FlattenDecision | None:
    """DeepSpeed's flatten branch for a stage 1-2 setup (None at other stages and in paper mode). The flat buffer
    holds the trainable parameters (``trainable_numel``, default all ``numel``); the card holds all of them."""
    if setup.stage not in (ZeroStage.OPTIMIZER_STATES, ZeroStage.GRADIENTS) or setup.mode == "paper":
        return None
    trainable = numel if trainable_numel is None else trainable_numel
    flat = DTYPE_BYTES[setup.dtype] * flat_group_numel(trainable, setup.world_size)
    free = free_at_flatten_bytes(setup, numel, overheads, real_comm=real_comm)
    return FlattenDecision(on_gpu=free is None or free >= flat, free_bytes=free, flat_buffer_bytes=flat)


def flatten_note(decision: FlattenDecision | None) -> str | None:
    """The assumption line of the estimate for this decision."""
    if decision is None:
        return None
    flat = decision.flat_buffer_bytes / GiB
    if decision.assumed:
        return ("card unknown: assumed DeepSpeed flattens the parameter group on the GPU next to the parameters "
                "(two 16-bit copies at init; stage_1_and_2.py DeepSpeedZeroOptimizer.__init__); --gpu gives "
                "the card and its branch")
    free = decision.free_bytes / GiB
    if decision.on_gpu:
        return (f"the card has {free:.2f} GiB free at the flatten >= the flat buffer's {flat:.2f} GiB: DeepSpeed "
                "flattens on the GPU (two 16-bit copies at init)")
    return (f"the card has {free:.2f} GiB free at the flatten < the flat buffer's {flat:.2f} GiB: DeepSpeed moves "
            "the parameters to the host and flattens there (one 16-bit copy at init)")

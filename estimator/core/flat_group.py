"""The flat 16-bit group of ZeRO stages 1-2 and each rank's slice of it (runtime/zero/stage_1_and_2.py).

Notation as in ``estimator.model_states``: P parameters, N = N_d ranks, P' the flat group padded to a multiple of
2N, p = P'/N the slice rank r owns, [r p, (r + 1) p), in ``named_parameters`` order. Also the blocks its init
leaves cached (``stage12_init_cache``, the K of ``core.reserved``).
"""

from __future__ import annotations

import bisect
from functools import lru_cache
from itertools import accumulate

from zeroest.estimator.core.architecture import param_tensors
from zeroest.estimator.core.setup import DTYPE_BYTES, TrainingSetup
from zeroest.estimator.units import round_up

FP32 = 4
NCCL_START_ALIGNMENT_FACTOR = 2
"""stage_1_and_2.py ``DeepSpeedZeroOptimizer.__init__``: flat groups are padded to ``2 * N`` elements."""


def flat_group_numel(numel: int, world_size: int) -> int:
    """P': ``flatten_dense_tensors_aligned`` pads the group to ``nccl_start_alignment_factor * N`` elements."""
    return round_up(numel, NCCL_START_ALIGNMENT_FACTOR * world_size)


@lru_cache(maxsize=65536)
def _overlap_numel(numels: tuple[int, ...], world_size: int, rank: int) -> int:
    starts = [0, *accumulate(numels)]
    part = flat_group_numel(starts[-1], world_size) // world_size
    lo, hi = rank * part, (rank + 1) * part
    first = max(bisect.bisect_right(starts, lo) - 1, 0)
    last = min(bisect.bisect_left(starts, hi) - 1, len(numels) - 1)
    return starts[last + 1] - starts[first] if first <= last else 0


def stage1_partition_copy_bytes(setup: TrainingSetup, numels: tuple[int, ...] | None = None) -> int:
    """Stage 1 (``overlap_comm`` off): b * max over ranks of (P_ov - F), the part of ``grads_in_partition`` not
    yet paid for by gradients freed when DeepSpeed allocates it at the end of backward.

    stage_1_and_2.py: at stage 1 the gradient hooks reduce nothing; ``engine.backward`` ends with
    ``reduce_gradients``, which walks the parameters in ``named_parameters`` order
    (``reduce_independent_p_g_buckets_and_remove_grads``): each gradient is copied into the ipg bucket and its
    ``param.grad`` re-pointed there (its own storage freed), except one larger than ``reduce_bucket_size`` B_r,
    which is reduced alone. A full bucket is reduced (``reduce_ipg_grads``), and for each of its parameters in the
    rank's partition ``copy_grads_in_partition`` copies the gradient into ``grads_in_partition``, allocated at the
    first one: b * P_ov, the whole parameters overlapping the rank's slice (``stage2_grad_numel``). F is the
    elements already moved into the bucket by then. The epilogue (``independent_gradient_partition_epilogue`` ->
    ``get_flat_partition(..., return_tensor_list=True)``) takes views of it and flattens nothing. With
    ``contiguous_gradients`` off nothing is copied: 0.
    """
    if not setup.zero.contiguous_gradients:
        return 0
    numels = numels or tuple(t.numel for t in param_tensors(setup.model))  # the flat group's: trainable ones
    world = setup.world_size
    return DTYPE_BYTES[setup.dtype] * max(
        _partition_copy_excess(numels, world, setup.zero.reduce_bucket_size, r) for r in range(world))


def _bucket_reductions(numels: tuple[int, ...], bucket: int):
    """The stage-1 boundary walk (``reduce_gradients``): for each ``reduce_ipg_grads``, the tensors it reduces and
    the elements whose own gradient storage is freed by then (moved into a bucket: all but those larger than the
    bucket, which are reduced alone)."""
    freed = filled = 0
    waiting: list[int] = []
    for i, n in enumerate([*numels, None]):
        if n is None or filled + n > bucket:  # reduce_ipg_grads on the bucket so far (the last one at the end)
            if waiting:
                yield waiting, freed
            waiting, filled = [], 0
        if n is None:
            break
        waiting.append(i)
        filled += n
        freed += n if n <= bucket else 0


def _slice_bounds(numels: tuple[int, ...], world_size: int, rank: int) -> tuple[list[int], int, int]:
    starts = [0, *accumulate(numels)]
    part = flat_group_numel(starts[-1], world_size) // world_size
    return starts, rank * part, (rank + 1) * part


@lru_cache(maxsize=4096)
def _partition_copy_excess(numels: tuple[int, ...], world_size: int, bucket: int, rank: int) -> int:
    starts, lo, hi = _slice_bounds(numels, world_size, rank)
    overlap = _overlap_numel(numels, world_size, rank)
    for waiting, freed in _bucket_reductions(numels, bucket):
        if any(starts[j] < hi and starts[j + 1] > lo for j in waiting):
            return max(0, overlap - freed)
    return 0


def stage1_offload_norm_excess_bytes(setup: TrainingSetup, numels: tuple[int, ...], norm_bytes: int) -> int:
    """Stage 1 with optimizer offload, ``overlap_comm`` off: max over ranks and boundary reductions of
    (``norm_bytes`` x n_slice - b F), what the per-parameter norm copy adds above the gradients still held.

    The same walk as ``stage1_partition_copy_bytes``: every ``param.grad`` (bP) is held to the end of backward,
    then ``reduce_gradients`` moves them into the ipg bucket (freeing their own storage: F elements by then), and
    each full bucket's in-partition parameters go through ``copy_grads_in_partition``, where the offload path
    copies one in-partition slice at a time (``norm_bytes`` an element: ``model_states.offload_copy_temp_bytes``).
    Measured on the H200 (data/runs/h200-cards, h200-edge, N_d = 2, 24 GB card): qwen2.5-1.5b backward 8.06 GiB,
    qwen2.5-3b 14.84; n_slice is the tied embedding, F its bucket's elements.
    """
    if not setup.zero.contiguous_gradients:
        return norm_bytes * max(largest_slice_numel(numels, setup.world_size, r) for r in range(setup.world_size))
    b = DTYPE_BYTES[setup.dtype]
    return max(_offload_norm_excess(numels, setup.world_size, setup.zero.reduce_bucket_size, r, norm_bytes, b)
               for r in range(setup.world_size))


@lru_cache(maxsize=4096)
def _offload_norm_excess(numels: tuple[int, ...], world_size: int, bucket: int, rank: int, norm_bytes: int,
                         b: int) -> int:
    starts, lo, hi = _slice_bounds(numels, world_size, rank)
    worst = 0
    for waiting, freed in _bucket_reductions(numels, bucket):
        slices = [min(starts[j + 1], hi) - max(starts[j], lo) for j in waiting]
        worst = max(worst, norm_bytes * max(slices) - b * freed)
    return worst


@lru_cache(maxsize=4096)
def largest_slice_numel(numels: tuple[int, ...], world_size: int, rank: int) -> int:
    """The largest overlap of one tensor with rank ``rank``'s slice of the flat group."""
    starts, lo, hi = _slice_bounds(numels, world_size, rank)
    return max((min(end, hi) - max(start, lo) for start, end in zip(starts[:-1], starts[1:], strict=True)), default=0)


def stage2_grads_before_embedding_numel(numels: tuple[int, ...], world_size: int) -> int:
    """Elements of ``grads_in_partition`` already allocated when the token embedding's gradient is made, the last
    of backward: the largest over the ranks whose slice reaches past the embedding (numels[0], first in
    ``named_parameters``); a rank whose slice lies inside the embedding allocates it only when that gradient is
    reduced (stage_1_and_2.py ``copy_grads_in_partition``, at the first in-partition reduction)."""
    part = flat_group_numel(sum(numels), world_size) // world_size
    return max((_overlap_numel(numels, world_size, r) for r in range(world_size) if (r + 1) * part > numels[0]),
               default=0)


def stage2_grads_at_head_numel(numels: tuple[int, ...], head: int, world_size: int) -> int:
    """Elements of ``grads_in_partition`` allocated when the gradient hook of tensor ``head`` (the lm_head, whose
    gradient is the first of backward) runs: ``copy_grads_in_partition`` allocates the rank's whole buffer at its
    first in-partition reduction, so on a rank whose slice overlaps the head it is there from that hook on; the
    largest over those ranks, 0 where none overlaps."""
    starts = [0, *accumulate(numels)]
    part = flat_group_numel(starts[-1], world_size) // world_size
    lo, hi = starts[head], starts[head + 1]
    return max((_overlap_numel(numels, world_size, r) for r in range(world_size)
                if r * part < hi and (r + 1) * part > lo), default=0)


def stage12_init_cache(trainable_numel: int, world: int, dtype_bytes: int, largest_param_bytes: int, *,
                       offload: bool) -> int:
    """K at ZeRO-1/2 with one parameter group (stage_1_and_2.py ``DeepSpeedZeroOptimizer.__init__``; P_t the
    trainable parameters, N_d ranks, b bytes each, n_max the largest parameter tensor):
    ``flatten_dense_tensors_aligned`` copies the model into one flat block (b P_t) while the model's own tensors
    are live (allocated peak 2 b P_t), ``_update_model_bit16_weights`` frees those tensors (b P_t, per-tensor
    blocks), ``weights_partition = partition.clone().to(fp32)`` frees its 16-bit clone (b P_t / N_d), and
    ``initialize_optimizer_states`` then allocates the fp32 master and its zero gradient, X = 2 * 4 P_t / N_d,
    larger than any of those freed blocks, so in new segments (the states of Adam come lazily, at the first step).
    The freed model is reused only as far as X passes it: K = b P_t / N_d + min(b P_t, X). With optimizer offload
    the master and the gradient are on the host: K = b P_t / N_d. A freed block at least as large as a request
    (b n_max >= the request) holds it instead: that piece then counts 0. With more parameter groups, DeepSpeed's
    ``empty_cache()`` at the start of each group's flattening gives the earlier groups' freed blocks back, and
    the last group (the HF Trainer's no-decay norms and biases) leaves almost none: K = 0 there.
    Measured on data/runs (one group, H100 and H200): K / b P_t = 1.57 at N_d 2 (1.5), 1.25-1.33 at N_d 4 (1.25),
    0.52-0.67 at N_d 8 (0.625); with offload 1.04-1.06 at N_d 1 (1), 0.54-0.57 at N_d 2 (0.5)."""
    clone = dtype_bytes * trainable_numel // world
    later = 0 if offload else 2 * FP32 * trainable_numel // world
    clone = clone if clone > largest_param_bytes else 0
    later = later if later // 2 > largest_param_bytes else 0
    return clone + min(dtype_bytes * trainable_numel, later)

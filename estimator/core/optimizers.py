"""Optimizer states and update temporaries, on the tensors the optimizer really sees at each ZeRO stage.

What the optimizer is handed depends on DeepSpeed's wrapper (engine.py ``_do_optimizer_sanity_check``):

* ZeRO 1-2: one flat 1-D fp32 partition per param group (stage_1_and_2.py ``DeepSpeedZeroOptimizer.__init__``:
  ``param_group['params'] = [self.single_partition_of_fp32_groups[i]]``).
* ZeRO 3: 1-D fp32 sub-groups of at most ``sub_group_size`` elements (stage3.py ``_create_fp32_partitions``,
  ``fp32_partitioned_groups_flat``), handed to the optimizer one sub-group at a time.
* stage 0, bf16/fp16 with FusedAdam: ``FP16_Optimizer``, one flat fp32 copy per group (fp16/fused_optimizer.py
  ``fp32_groups_flat``); with any other optimizer ``FP16_UnfusedOptimizer``, an fp32 copy of each parameter with
  its shape (fp16/unfused_optimizer.py ``fp32_groups``: ``p.clone().float()``); in fp32, the model's parameters.

So an optimizer that treats a >= 2-D tensor differently (Adafactor's factored moments, bitsandbytes'
``min_8bit_size``, Muon's Newton-Schulz) sees only 1-D tensors under ZeRO. With several parameter groups
(``Optimizer.param_groups``, the HF Trainer's decay / no-decay pair) ZeRO flattens each group apart, so the optimizer
sees one more, small 1-D tensor (norms and biases): its own bitsandbytes blocks and ``min_8bit_size`` test change the
states by at most 8 bytes per element of that group (kilobytes); the states are summed as over one group. Frozen
parameters are in no group. Notation: n the elements of one tensor the optimizer sees, (m, k) a matrix's shape,
r = min(m, k), b bytes of the training dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

from zeroest.estimator.core.adapters import trainable_split
from zeroest.estimator.core.architecture import ParamTensor
from zeroest.estimator.core.setup import DTYPE_BYTES, TrainingSetup
from zeroest.estimator.core.vocab import ADAM_FAMILY, EIGHT_BIT, OptimizerImpl, OptimizerName, ZeroStage
from zeroest.estimator.units import ceil_div, round_up

FP32 = 4
BNB_BLOCK = 256
"""bitsandbytes optim/optimizer.py ``Optimizer2State.init_state``: ``blocksize = 256`` elements per fp32 absmax."""
BNB_MIN_8BIT_SIZE = 4096
"""bitsandbytes ``Optimizer2State`` default ``min_8bit_size``: smaller tensors keep fp32 states."""
BNB_QMAP_BYTES = 2 * 256 * FP32
"""The two 256-entry fp32 quantisation maps (``name2qmap["dynamic"]``, ``["udynamic"]``), shared by all tensors."""
NS_DTYPE_BYTES = 2
"""Muon's Gram Newton-Schulz runs in fp16 (muon/original_muon.py ``ns_compute_dtype("gram")``)."""
NS_SQUARE_TEMPS = 4
"""r x r fp16 matrices alive at once in ``zeropower_via_gram_newtonschulz``: R, Z = bR + cR@R (with R@R), Q."""
MUON_EXCLUDED = ("embed", "lm_head")
"""deepspeed/__init__.py ``set_optimizer_flags``: a >= 2-D parameter whose name holds one of these gets Adam."""


@dataclass(frozen=True)
class Seen:
    """One tensor as the optimizer sees it: its elements and, for a matrix, its (rows, columns)."""

    numel: int
    matrix: tuple[int, int] | None = None


def matrix_shape(tensor: ParamTensor, hidden_size: int) -> tuple[int, int] | None:
    """(rows, columns) of a 2-D parameter: a Linear's (out, in), an embedding's (rows, h); None for a vector or a
    tensor whose shape is not kept (a router's bare weight, fused 3-D experts: treated as 1-D, the larger case for every
    optimizer here)."""
    if tensor.linear_shape is not None:
        return tensor.linear_shape
    if tensor.component in ("embeddings", "position_embeddings") and tensor.numel % hidden_size == 0:
        return (tensor.numel // hidden_size, hidden_size)
    return None


def flat_at_stage0(setup: TrainingSetup) -> bool:
    """Stage 0 in bf16/fp16 with FusedAdam: ``FP16_Optimizer`` flattens (engine.py ``_configure_fp16_optimizer``
    checks ``isinstance(optimizer, FusedAdam)``; FusedLion and Muon get ``FP16_UnfusedOptimizer``)."""
    return setup.dtype != "fp32" and setup.optimizer.name in ADAM_FAMILY and setup.optimizer.impl == OptimizerImpl.FUSED


def seen_tensors(setup: TrainingSetup, numel: int) -> tuple[Seen, ...]:
    """The tensors the optimizer is handed: the parameters with their shapes at stage 0 (unless flattened), else
    1-D flats (one partition at stages 1-2; sub-groups of ``sub_group_size`` at stage 3)."""
    if setup.stage == ZeroStage.DISABLED and not flat_at_stage0(setup):
        h = setup.model.hidden_size
        return tuple(Seen(t.numel, matrix_shape(t, h)) for t in trainable_split(setup.model, setup.adapters).trainable)
    if setup.stage == ZeroStage.PARAMETERS and setup.zero.sub_group_size:
        size = setup.zero.sub_group_size
        return tuple(Seen(min(size, numel - start)) for start in range(0, numel, size))
    return (Seen(numel),)


def adafactor_bytes(seen: Seen) -> int:
    """torch/optim/_adafactor.py ``_init_group``: a >= 2-D tensor keeps ``row_var`` (m) and ``col_var`` (k), fp32;
    a 1-D one ``variance`` (n). transformers optimization.py ``Adafactor._get_options`` / ``step`` the same
    (``exp_avg_sq_row``, ``exp_avg_sq_col``; ``exp_avg_sq`` for 1-D) with its default beta1 = None (no exp_avg)."""
    return FP32 * (sum(seen.matrix) if seen.matrix else seen.numel)


def bnb_8bit_bytes(numel: int) -> int:
    """bitsandbytes optim/optimizer.py ``Optimizer2State.init_state``, per tensor of n elements: n <
    ``min_8bit_size``: ``state1``, ``state2`` fp32 (8n); else uint8 states (2n) plus ``absmax1``/``absmax2``, one fp32
    per block of 256: 2 * 4 * ceil(n / 256)."""
    if numel < BNB_MIN_8BIT_SIZE:
        return 2 * FP32 * numel
    return 2 * numel + 2 * FP32 * ceil_div(numel, BNB_BLOCK)


def _muon_split(setup: TrainingSetup) -> tuple[tuple[int, ...], tuple[int, ...], tuple[tuple[int, int], ...]]:
    """(Muon numels, Adam numels, Muon matrix shapes) in the order of their flat groups (``set_optimizer_flags``:
    Muon for >= 2-D parameters whose name holds neither "embed" nor "lm_head"; the Muon group sorted by shape,
    descending; the Adam group in ``named_parameters`` order)."""
    h = setup.model.hidden_size
    shapes, adam = [], []
    for t in trainable_split(setup.model, setup.adapters).trainable:  # frozen weights are in no group
        shape = matrix_shape(t, h)
        if shape and not any(word in t.name.lower() for word in MUON_EXCLUDED):
            shapes.append(shape)
        else:
            adam.append(t.numel)
    shapes = sorted(shapes, reverse=True)  # original_muon.py ``MuonWithAuxAdam.__init__``: by ``size()``, descending
    return tuple(m * k for m, k in shapes), tuple(adam), tuple(shapes)


def _whole_overlap(numels: tuple[int, ...], world: int) -> int:
    """Elements of the whole tensors overlapping the largest rank's slice of their flat group (padded to 2N)."""
    if not numels:
        return 0
    starts = [0, *accumulate(numels)]
    part = round_up(starts[-1], 2 * world) // world
    best = 0
    for rank in range(world):
        lo, hi = rank * part, (rank + 1) * part
        best = max(best, sum(n for s, n in zip(starts, numels, strict=False) if s < hi and s + n > lo))
    return best


def muon_state_bytes(setup: TrainingSetup) -> int:
    """MuonWithAuxAdam's states per rank (runtime/zero/muon/muon_optimizer.py; the aux Adam keeps exp_avg and
    exp_avg_sq, 8 bytes per element of the Adam half).

    * stage 0: a fp32 ``momentum_buffer`` per Muon matrix (``zeros_like`` of the fp32 copy): 4 M + 8 A.
    * stages 1-2: the Muon half is its own flat group; stage_1_and_2.py ``_muon_momentum_buffer`` keeps the momentum
      of the whole Muon matrices overlapping the partition, in the gradient dtype (b), and
      ``_muon_staging_momentum`` a copy of it kept across steps: 2 b M_in; Adam on its partition: 8 A / N.
    * stage 3: stage3.py ``_create_momentum_buffer``, one per Muon sub-group partition in the communication dtype
      (b): b M3 + 8 A3, M3 and A3 the sums of ceil(n / N) over each half.
    """
    muon, adam, _ = _muon_split(setup)
    world, b = setup.world_size, DTYPE_BYTES[setup.dtype]
    if setup.stage == ZeroStage.DISABLED:
        return FP32 * sum(muon) + 2 * FP32 * sum(adam)
    if setup.stage == ZeroStage.PARAMETERS:
        return b * sum(ceil_div(n, world) for n in muon) + 2 * FP32 * sum(ceil_div(n, world) for n in adam)
    adam_part = round_up(sum(adam), 2 * world) // world if adam else 0
    return 2 * b * _whole_overlap(muon, world) + 2 * FP32 * adam_part


def state_bytes(setup: TrainingSetup, numel: int) -> int:
    """Optimizer states over ``numel`` elements (P at stage 0, the partition p at 1-2, P3 at 3), summed over
    ``seen_tensors``: Adam/AdamW 8n, SGD with momentum and Lion (ops/lion ``FusedLion``: exp_avg) 4n, SGD 0,
    Adafactor ``adafactor_bytes``, 8-bit AdamW ``bnb_8bit_bytes`` plus the shared maps, Muon ``muon_state_bytes``."""
    name = setup.optimizer.name
    if name == OptimizerName.MUON:
        return muon_state_bytes(setup)
    per_element = {OptimizerName.ADAM: 2, OptimizerName.ADAMW: 2, OptimizerName.SGD_MOMENTUM: 1,
                   OptimizerName.LION: 1, OptimizerName.SGD: 0}
    if name in per_element:
        return per_element[name] * FP32 * numel
    seen = seen_tensors(setup, numel)
    if name == OptimizerName.ADAFACTOR:
        return sum(adafactor_bytes(s) for s in seen)
    if name in EIGHT_BIT:
        quantised = any(s.numel >= BNB_MIN_8BIT_SIZE for s in seen)
        return sum(bnb_8bit_bytes(s.numel) for s in seen) + (BNB_QMAP_BYTES if quantised else 0)
    raise ValueError(f"no state model for optimizer {name!r}")


def muon_ns_temp_bytes(rows: int, cols: int, grad_bytes: int) -> int:
    """Newton-Schulz temporaries of one (m, k) matrix, eager: original_muon.py ``muon_update`` then
    ``zeropower_via_gram_newtonschulz``: the normalised fp16 X (2mk), R, Z, R@R and Q (4 x 2 r^2), Q @ X (2mk)
    and its cast back to the gradient dtype (g mk): (2 + 2 + g) m k + 8 r^2. Not measured (no GPU run yet)."""
    r = min(rows, cols)
    return (2 * NS_DTYPE_BYTES + grad_bytes) * rows * cols + NS_SQUARE_TEMPS * NS_DTYPE_BYTES * r * r


def muon_temp_bytes(setup: TrainingSetup) -> int:
    """Muon's step temporaries: Newton-Schulz on the largest Muon matrix (``muon_ns_temp_bytes``, gradient dtype
    b); at stage 3 also the full gradients all-gathered for it, b * min(bucket, M) at a time (stage3.py
    ``_apply_muon_updates``: chunks of at most ``reduce_bucket_size`` elements, or one matrix)."""
    muon, _, shapes = _muon_split(setup)
    if not muon:
        return 0
    b = DTYPE_BYTES[setup.dtype]
    ns = max(muon_ns_temp_bytes(m, k, b) for m, k in shapes)
    if setup.stage == ZeroStage.PARAMETERS:
        ns += b * min(sum(muon), max(max(muon), setup.zero.reduce_bucket_size))
    return ns



def optimizer_notes(setup: TrainingSetup) -> list[str]:
    """What the printed assumptions say about the optimizer's states, where they are not plain fp32 per element."""
    name, zero = setup.optimizer.name, setup.stage >= ZeroStage.OPTIMIZER_STATES
    notes = []
    if name == OptimizerName.ADAFACTOR:
        notes.append("Adafactor sees ZeRO's 1-D flat partitions: a full fp32 second moment (4 bytes per parameter), "
                     "not factored" if zero else "Adafactor: factored row and column moments on matrices")
    if name in EIGHT_BIT:
        notes.append("bitsandbytes 8-bit AdamW passed as a client optimizer (zero_allow_untested_optimizer): uint8 "
                     "states and an fp32 absmax per 256 elements" + (", on one flat partition" if zero else ""))
    if name == OptimizerName.PAGED_ADAMW_8BIT:
        notes.append("paged states (tensors >= 1e5 elements) live in CUDA managed memory, counted on the GPU (the "
                     "larger case); torch's allocator does not report them")
    if name == OptimizerName.MUON:
        notes.append("Muon: momentum for the hidden matrices, Adam for embeddings, lm_head and vectors; its "
                     "Newton-Schulz temporaries are the eager upper bound, unvalidated on a GPU")
    return notes


def optimizer_temp_bytes(setup: TrainingSetup, tensor_numels: tuple[int, ...], device: str) -> int:
    """Temporaries of the optimizer's update over tensors of these sizes.

    FusedAdam (csrc/adam/multi_tensor_adam.cu), FusedLion, DeepSpeed's CPU optimizers and bitsandbytes' 8-bit
    AdamW (functional.py ``optimizer_update_8bit_blockwise``, one CUDA kernel) update in place: 0. torch's AdamW
    (``torch_adam: true``, or ``torch.optim.AdamW`` as a client optimizer: ``foreach=None`` resolves to foreach on
    CUDA, torch/optim/optimizer.py ``_default_to_fused_or_foreach``, and fused is never the default) on CUDA takes
    the foreach path (torch/optim/adamw.py ``_multi_tensor_adamw``: ``exp_avg_sq_sqrt = torch._foreach_sqrt(...)``,
    one fp32 value per parameter of the group at once); on the CPU the single-tensor path
    (``_single_tensor_adamw``: ``exp_avg_sq.sqrt() / bias_correction2_sqrt``, two fp32 temporaries of the largest
    tensor). Measured on CPU: 8 * p at stages 1-2 (data/probe/llama_z1_bf16_n4_g1.json). SGD with momentum:
    ``_foreach_add`` of grad and momentum, one value per parameter on CUDA. Adafactor (torch/optim/_adafactor.py
    ``adafactor``: ``foreach=None`` is falsy, so ``_single_tensor_adafactor`` on every device): of a 1-D tensor
    ``grad * grad`` and ``variance.clone()`` (8n); of a matrix only ``var_estimate = row_var @ col_var`` (4mk: its
    moments come from ``torch.norm`` along each axis, no squared copy), the largest of either over the tensors
    (ZeRO's flats are 1-D; stage 0 hands it the model's matrices). Measured on the H200: qwen2.5-1.5b stage 0,
    N_d 1, the step 0.83 GiB under 8n of the embedding (data/runs/h200-optimizers).
    Muon: ``core.optimizers.muon_temp_bytes``.
    """
    name = setup.optimizer.name
    if not tensor_numels:
        return 0
    if name == "muon":
        return muon_temp_bytes(setup)
    if name == "adafactor":
        if setup.stage == ZeroStage.DISABLED and not flat_at_stage0(setup):
            return max(FP32 * t.numel * (1 if t.matrix else 2) for t in seen_tensors(setup, sum(tensor_numels)))
        return 2 * FP32 * max(tensor_numels)
    if setup.optimizer.impl != "torch" or name == "sgd":
        return 0
    if device == "cpu":
        return 2 * FP32 * max(tensor_numels)
    return FP32 * sum(tensor_numels)

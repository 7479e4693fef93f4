"""QLoRA's frozen base in 4 bits: the storage bitsandbytes gives each quantised weight (unvalidated on a GPU).

transformers' ``BitsAndBytesConfig(load_in_4bit=True)`` replaces every ``nn.Linear`` of the base but the output
layer (integrations/bitsandbytes.py ``replace_with_bnb_linear``, skipping ``get_keys_to_not_convert``: lm_head)
by ``bnb.nn.Linear4bit``, whose weight is quantised by bitsandbytes functional.py ``quantize_4bit`` (block size
64, ``quant_storage`` uint8). Embeddings, norms and biases stay in the compute dtype. Per weight of n elements, with
B = ceil(n / 64) blocks (read off ``quantize_4bit``'s ``QuantState`` on the CPU, bitsandbytes 0.50.2):

* packed weights: (n + 1) // 2 bytes (two 4-bit codes a byte);
* the NF4 code book: 16 fp32 (``QuantState.code``);
* without double quantisation: one fp32 absmax per block, 4B;
* with double quantisation (``compress_statistics``): the absmax quantised to uint8 (B bytes) by
  ``quantize_blockwise`` with block size 256, its own fp32 absmax per 256 blocks (4 ceil(B / 256)), its 256-entry
  fp32 code (``state2.code``) and the fp32 ``offset``.

So about 0.5 + 4/64 = 0.5625 bytes per weight without, 0.5 + 1/64 + 4/16384 ~ 0.516 with double quantisation.
"""

from __future__ import annotations

from dataclasses import replace

from zeroest.estimator.core.architecture import param_tensors
from zeroest.estimator.core.setup import DTYPE_BYTES, TrainingSetup
from zeroest.estimator.core.vocab import BaseQuant, ZeroStage
from zeroest.estimator.units import GiB, ceil_div

FP32 = 4
NF4_BLOCK = 64
"""``quantize_4bit`` default ``blocksize`` (``Linear4bit`` / ``Params4bit``)."""
NF4_CODE_BYTES = 16 * FP32
"""The 16-value NF4 code book each ``QuantState`` holds."""
DQ_BLOCK = 256
"""``quantize_blockwise`` block size for the absmax of double quantisation (``Params4bit._quantize``)."""
DQ_CODE_BYTES = 256 * FP32 + FP32
"""Double quantisation's 256-entry dynamic code (``state2.code``) and its fp32 ``offset``, per weight."""


def nf4_weight_bytes(numel: int, double_quant: bool) -> int:
    """Bytes of one NF4-quantised weight of ``numel`` elements (module docstring's terms)."""
    blocks = ceil_div(numel, NF4_BLOCK)
    packed = (numel + 1) // 2 + NF4_CODE_BYTES
    if not double_quant:
        return packed + FP32 * blocks
    return packed + blocks + FP32 * ceil_div(blocks, DQ_BLOCK) + DQ_CODE_BYTES


def quantized_weights(setup: TrainingSetup) -> tuple[int, ...]:
    """Elements of each weight ``Linear4bit`` replaces: every Linear of the base but lm_head."""
    return tuple(t.numel for t in param_tensors(setup.model) if t.linear_shape and t.component != "lm_head")


def base_bytes(setup: TrainingSetup) -> tuple[int, int]:
    """(bytes of the quantised weights in 4 bits, the same weights in the training dtype)."""
    numels = quantized_weights(setup)
    dq = setup.adapters.base_quant == BaseQuant.NF4_DQ
    return sum(nf4_weight_bytes(n, dq) for n in numels), DTYPE_BYTES[setup.dtype] * sum(numels)


def with_4bit_base(setup: TrainingSetup, states):
    """Stages 0-2 with a 4-bit base: the frozen Linear weights stay the model's own ``Linear4bit`` tensors (no ZeRO
    wrapper flattens a frozen parameter, ``core.model_states``), so the 16-bit params and the init peak hold
    ``base_bytes``' 4-bit size instead of the training dtype's. Stage 3 partitions every parameter; how it treats
    ``Params4bit`` is not modelled, so it keeps the 16-bit base (an upper bound)."""
    saved = base_saving_bytes(setup)
    if not saved:
        return states
    return replace(states, params_bytes=states.params_bytes - saved, init_peak_bytes=states.init_peak_bytes - saved)


def base_saving_bytes(setup: TrainingSetup) -> int:
    """Bytes a 4-bit base saves on the GPU against the same weights in the training dtype (``base_bytes``:
    plain - quantised) at stages 0-2; 0 without a 4-bit base and at stage 3, which keeps the 16-bit base
    (``with_4bit_base``)."""
    if setup.adapters.base_quant == BaseQuant.NONE or setup.stage == ZeroStage.PARAMETERS:
        return 0
    quant, plain = base_bytes(setup)
    return plain - quant


def qlora_note(setup: TrainingSetup) -> list[str]:
    """The printed assumption for a 4-bit base: its size, and where model states count it (unvalidated)."""
    if setup.adapters.base_quant == BaseQuant.NONE:
        return []
    quant, plain = base_bytes(setup)
    where = ("the model states count it at stages 0-2; stage 3 keeps the 16-bit base, an upper bound"
             if setup.stage != ZeroStage.PARAMETERS else "stage 3 keeps the 16-bit base in the model states, an "
             "upper bound")
    return [f"QLoRA base {setup.adapters.base_quant}: its Linear weights take {quant / GiB:.2f} GiB in 4 bits "
            f"against {plain / GiB:.2f} GiB in {setup.dtype} (bitsandbytes quantize_4bit layout; unvalidated on a "
            f"GPU: bitsandbytes is not on the validation machine); {where}; the backward's dequantised weight "
            "(one at a time) is not counted"]


def frozen_resident_bytes(setup: TrainingSetup, frozen_numel: int, dtype_bytes: int) -> int:
    """F_r: bytes of the frozen weights one rank holds from the load on (b P_f, P_f = ``frozen_numel``, the frozen
    parameters of ``core.adapters.trainable_split``): whole at stages 0-2 (no ZeRO wrapper flattens a frozen
    parameter), their 1/N_d partitions at stage 3; a 4-bit base at stages 0-2 in its NF4 storage
    (``core.qlora.base_saving_bytes``)."""
    frozen = dtype_bytes * frozen_numel
    if int(setup.stage) == 3:
        return frozen // setup.world_size
    return max(0, frozen - base_saving_bytes(setup))

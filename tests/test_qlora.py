"""QLoRA's 4-bit base (``core.qlora``): the bytes of one NF4 weight from bitsandbytes' layout, against the tensors
``bitsandbytes.functional.quantize_4bit`` really returns on the CPU, and the option's rules."""

from __future__ import annotations

import pytest
from test_optimizers import FF, LLAMA, MATRICES, H
from zeroest.estimator.core.adapters import Adapters
from zeroest.estimator.core.architecture import shape_from_config
from zeroest.estimator.core.qlora import base_bytes, nf4_weight_bytes, quantized_weights
from zeroest.estimator.core.setup import TrainingSetup


@pytest.mark.parametrize(("numel", "dq", "expected"), [
    # packed (n+1)//2, 16-entry code, fp32 absmax per 64: 88064 + 64 + 4 x 2752
    (FF * H, False, FF * H // 2 + 64 + 4 * (FF * H // 64)),
    # packed, code, uint8 absmax (2752), fp32 absmax per 256 blocks (11), 256-entry code and offset
    (FF * H, True, FF * H // 2 + 64 + FF * H // 64 + 4 * 11 + 4 * 256 + 4),
    (65, False, 33 + 64 + 4 * 2),  # odd n: one byte holds the last code alone; two blocks
])
def test_nf4_weight_bytes(numel, dq, expected):
    assert nf4_weight_bytes(numel, dq) == expected


@pytest.mark.slow  # imports bitsandbytes (~8 s the first time)
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("shape", [(FF, H), (H, H), (5, 13)])
def test_equals_bitsandbytes_quantize_4bit(shape, dq):
    torch = pytest.importorskip("torch")
    functional = pytest.importorskip("bitsandbytes.functional")
    packed, state = functional.quantize_4bit(torch.randn(shape, dtype=torch.bfloat16), blocksize=64,
                                             compress_statistics=dq, quant_type="nf4")
    tensors = [packed, state.absmax, state.code]
    if dq:
        tensors += [state.offset, state.state2.absmax, state.state2.code]
    assert sum(t.numel() * t.element_size() for t in tensors) == nf4_weight_bytes(shape[0] * shape[1], dq)


def test_lm_head_and_embeddings_stay():
    setup = TrainingSetup(model=shape_from_config(LLAMA, "probe-llama"),
                          adapters=Adapters(lora_rank=8, base_quant="nf4-dq"))
    assert quantized_weights(setup) == tuple(m * k for m, k in MATRICES) * 2
    quant, plain = base_bytes(setup)
    assert plain == 2 * 2 * sum(m * k for m, k in MATRICES)
    assert quant == 2 * sum(nf4_weight_bytes(m * k, True) for m, k in MATRICES)


def test_needs_lora():
    with pytest.raises(ValueError, match="--lora-rank"):
        Adapters(base_quant="nf4")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_model_states_hold_the_4bit_base_below_stage_3(stage):
    """Stages 0-2: the frozen Linear weights are the model's own Linear4bit tensors, so the 16-bit params and the
    init peak shrink by (training-dtype bytes - 4-bit bytes) of those weights; stage 3 keeps the 16-bit base."""
    from zeroest.estimator.catalog.models import load_model
    from zeroest.estimator.core.estimate import model_states
    from zeroest.estimator.core.qlora import base_bytes

    from zeroest.api import build_setup

    flags = {"lora_rank": 16, "world_size": 2, "activations": "closed-form"}
    plain = build_setup(load_model("llama-3-8b"), flags, stage=stage)
    quant = build_setup(load_model("llama-3-8b"), {**flags, "base_quant": "nf4-dq"}, stage=stage)
    four_bit, sixteen_bit = base_bytes(quant)
    saved = 0 if stage == 3 else sixteen_bit - four_bit
    a, b = model_states(plain), model_states(quant)
    assert a.params_bytes - b.params_bytes == saved
    assert a.init_peak_bytes - b.init_peak_bytes == saved
    assert a.master_weights_bytes == b.master_weights_bytes

"""ZeRO-3's memory-efficient linear (estimator/trace/zero3_linear.py): every Linear keeps its input.

DeepSpeed's ``zero3_linear_wrap`` (runtime/zero/linear.py, installed for the whole process by zero.Init or by
stage 3's ``Init(module=...)``) is patched into a real CPU run of the peft-wrapped tiny llama; the trace with
``zero3_linear`` must count the same saved bytes, and the closed form the same extra term. Measured on the H200:
data/runs/h200-zero3-linear (LoRA q,v at stage 3 without checkpointing, -6.1% / -10.3% before).
"""

from __future__ import annotations

import pytest
from test_activations import TINY, B, S, saved_bytes_of_forward
from test_lora_activations import _peft, _real
from zeroest.estimator.core.adapters import Adapters, frozen_base_names
from zeroest.estimator.core.architecture import shape_from_config
from zeroest.estimator.core.closed_form import closed_form_profile
from zeroest.estimator.trace import polys, tracer

pytestmark = pytest.mark.deepspeed
LLAMA = TINY["llama"]
QV = Adapters(lora_rank=8, lora_targets="q_proj,v_proj")
DROPOUT = Adapters(lora_rank=8, lora_dropout=0.1)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROEST_CACHE_DIR", str(tmp_path / "profiles"))
    monkeypatch.setattr(tracer, "_MEMO", {})


def _deepspeed_saved_bytes(adapters: Adapters) -> int:
    """A real CPU forward with DeepSpeed's own ``zero3_linear_wrap`` as ``torch.nn.functional.linear``."""
    torch = _peft()
    linear = pytest.importorskip("deepspeed.runtime.zero.linear")
    original = torch.nn.functional.linear
    torch.nn.functional.linear = linear.zero3_linear_wrap
    try:
        return saved_bytes_of_forward(*_real(adapters, grad_ckpt=False))
    finally:
        torch.nn.functional.linear = original


@pytest.mark.slow
@pytest.mark.parametrize("adapters", [QV, DROPOUT], ids=["q,v", "dropout"])
def test_traced_zero3_linear_equals_deepspeed_on_cpu(adapters):
    """The meta trace (CPU kernels) with stage 3's linear, extrapolated to the 3 layers, counts exactly the bytes
    a CPU run with DeepSpeed's ``zero3_linear_wrap`` saves."""
    entry = tracer.trace_polys(LLAMA, "bf16", "sdpa", target="cpu", adapters=adapters, zero3_linear=True)
    at = {name: polys.evaluate(poly, B, S) for name, poly in entry["plain"]["regions"].items()}
    traced = at["embed"] + at["layer0"] + 2 * at["layer1"] + at["head"] + at["loss"]
    assert traced == _deepspeed_saved_bytes(adapters)


def test_closed_form_keeps_the_frozen_linears_inputs():
    """q,v LoRA without dropout: lora_A keeps the first norm's output; stage 3's linear adds per layer the second
    norm's output (h), the gated product down_proj reads (i), and the final norm's output once at lm_head (h);
    the attention output o_proj reads is the cuDNN kernel's own saved output either way. bf16: 2 T (h + i)."""
    shape = shape_from_config(LLAMA, "tiny")
    h, i, T = LLAMA["hidden_size"], LLAMA["intermediate_size"], B * S  # noqa: N806 (the formulas' symbol)
    plain = closed_form_profile(shape, B, S, "bf16", "sdpa", LLAMA, adapters=QV)
    stage3 = closed_form_profile(shape, B, S, "bf16", "sdpa", LLAMA, adapters=QV, zero3_linear=True)
    assert stage3.layer_saved_bytes - plain.layer_saved_bytes == 2 * T * (h + i)
    assert stage3.head_saved_bytes - plain.head_saved_bytes == 2 * T * h
    # a full fine-tune's Linears keep their inputs anyway
    full = closed_form_profile(shape, B, S, "bf16", "sdpa", LLAMA)
    assert closed_form_profile(shape, B, S, "bf16", "sdpa", LLAMA, zero3_linear=True) == full


@pytest.mark.slow
def test_closed_form_and_trace_agree_on_the_stage3_term():
    """The extra bytes stage 3's linear adds, per layer and at the head, are the same in the trace (CUDA kernels)
    and in the closed form."""
    _peft()
    shape = shape_from_config(LLAMA, "tiny")
    frozen = frozen_base_names(shape, QV)
    traced = {z: tracer.traced_profile(shape, B, S, config=LLAMA, adapters=QV, frozen=frozen, zero3_linear=z)
              for z in (False, True)}
    closed = {z: closed_form_profile(shape, B, S, "bf16", "sdpa", LLAMA, adapters=QV, zero3_linear=z)
              for z in (False, True)}
    for field in ("layer_saved_bytes", "head_saved_bytes"):
        assert (getattr(traced[True], field) - getattr(traced[False], field)
                == getattr(closed[True], field) - getattr(closed[False], field)), field

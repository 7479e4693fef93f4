"""Models whose decoder layers differ: the kinds ``trace.kinds`` reads off the full-depth model, and the traced
profile against the project's recorder run over every layer of the real model.

Expectations come from transformers' own models: DeepSeek-V3 with ``first_k_dense_replace`` dense layers below
the MoE ones, Qwen3-MoE with ``mlp_only_layers``, Gemma2's alternating ``layer_types``, built at full depth on
the meta device; the reference is ``recorder.run_trace`` over that whole model (CPU kernels), its saved storages
still alive at the end of forward summed by region, and its live bytes replayed event by event.
"""

from __future__ import annotations

import pytest
from test_activations import TINY, B, S, _torch
from test_families import NEW
from zeroest.estimator.core.adapters import Adapters, frozen_base_names
from zeroest.estimator.core.architecture import shape_from_config
from zeroest.estimator.trace import kinds, polys, recorder, tracer
from zeroest.estimator.trace.model import build_model, build_trained

DEEPSEEK = NEW["deepseek_v3"]  # 3 layers, first_k_dense_replace=1: dense, MoE, MoE
QWEN3_MOE = dict(NEW["qwen3_moe"], num_hidden_layers=4, mlp_only_layers=[0, 2])  # dense, MoE, dense, MoE
GEMMA2 = dict(NEW["gemma2"], num_hidden_layers=4)  # sliding, full, sliding, full


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROEST_CACHE_DIR", str(tmp_path / "profiles"))
    monkeypatch.setattr(tracer, "_MEMO", {})


@pytest.mark.parametrize(("config", "attn", "want"), [
    (TINY["llama"], "sdpa", dict(kinds=[0, 0, 0], picks=[0, 1], first=[0], steady=[1])),
    (DEEPSEEK, "sdpa", dict(kinds=[0, 1, 1], picks=[0, 0, 1, 2], first=[0, 2], steady=[1, 3])),
    (QWEN3_MOE, "sdpa", dict(kinds=[0, 1, 0, 1], picks=[0, 1, 2, 3], first=[0, 1], steady=[2, 3])),
    (GEMMA2, "eager", dict(kinds=[0, 1, 0, 1], picks=[0, 1, 2, 3], first=[0, 1], steady=[2, 3])),
], ids=["llama", "deepseek_v3", "qwen3_moe", "gemma2"])
def test_kinds_read_off_the_full_depth_model(config, attn, want):
    """One kind for alike layers (the 2-layer copy of before); a kind of one layer (deepseek's dense layer 0)
    traced with a deep copy of itself; gemma2's kinds from ``layer_types`` alone (the same parameters)."""
    _torch()
    model = build_model(config, "bf16", attn, num_layers=None)
    plan = kinds.layout(model)
    assert plan == want
    kinds.cut(model, plan)
    layers = model.model.layers
    assert len(layers) == model.config.num_hidden_layers == len(want["picks"])
    assert len({id(p) for layer in layers for p in layer.parameters()}) == sum(
        len(list(layer.parameters())) for layer in layers)  # a repeated pick is a copy, not the same weights
    if "layer_types" in kinds.per_layer_keys(model.config, len(layers)):
        assert list(model.config.layer_types) == [config_types(config)[i] for i in want["picks"]]


_SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
              max_position_embeddings=256, num_hidden_layers=4)


@pytest.mark.parametrize(("config", "want"), [
    (dict(model_type="llama4_text", head_dim=16, intermediate_size_mlp=128, num_local_experts=4,
          interleave_moe_layer_step=2, **_SMALL), [0, 1, 0, 2]),
    (dict(model_type="smollm3", no_rope_layer_interval=2, pad_token_id=0, **_SMALL), [0, 1, 0, 1]),
    (dict(model_type="qwen2_moe", num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64,
          decoder_sparse_step=2, **_SMALL), [0, 1, 0, 1]),
], ids=["llama4_text", "smollm3", "qwen2_moe"])
def test_interleaved_layers(config, want):
    """Llama4's interleaved MoE layers (``interleave_moe_layer_step``) and rope-less layers (``no_rope_layers``:
    every 4th by default, here layer 3), SmolLM3's ``no_rope_layers``, Qwen2-MoE's ``decoder_sparse_step``."""
    _torch()
    assert kinds.layout(build_model(config, "bf16", "eager", num_layers=None))["kinds"] == want


def config_types(config: dict) -> list[str]:
    from transformers import AutoConfig

    cfg = dict(config)
    return list(AutoConfig.for_model(cfg.pop("model_type"), **cfg).layer_types)


def _full_depth(model, grad_ckpt: bool) -> dict[str, int]:
    """The recorder over every layer of ``model``: saved bytes of the embeddings and all layers still alive at
    the end of forward, and the live bytes at the end of forward, at its peak and at the backward's peak
    (parameter gradients left out, as the profile leaves them)."""
    torch = _torch()
    trace = recorder.run_trace(model, torch.zeros((B, S), dtype=torch.long, device="meta"), grad_ckpt=grad_ckpt,
                               target="cpu")
    return recorder.replay(trace)


def _check(profile, full: dict[str, int], grad_ckpt: bool) -> None:
    assert profile.stack_bytes(grad_ckpt) == full["stack"]
    assert profile.forward_end_bytes(grad_ckpt) == full["forward_end"]
    assert profile.backward_peak_bytes(grad_ckpt) == full["backward_peak"]
    # a few bytes at the loss: the (b, s + 1) padded labels fitted as b*s (benchmarks/cuda_check_activations.py),
    # the same for a model of alike layers
    assert 0 <= full["forward_peak"] - profile.forward_peak_bytes(grad_ckpt) <= 12


@pytest.mark.parametrize(("config", "attn", "grad_ckpt"), [
    (DEEPSEEK, "sdpa", False), pytest.param(DEEPSEEK, "sdpa", True, marks=pytest.mark.slow),
    pytest.param(QWEN3_MOE, "sdpa", False, marks=pytest.mark.slow), (QWEN3_MOE, "sdpa", True),
    *(pytest.param(GEMMA2, "eager", ckpt, marks=pytest.mark.slow) for ckpt in (False, True)),
], ids=["deepseek_v3-plain", "deepseek_v3-ckpt", "qwen3_moe-plain", "qwen3_moe-ckpt", "gemma2-plain", "gemma2-ckpt"])
def test_traced_profile_equals_the_full_depth_trace(config, attn, grad_ckpt):
    """Per-kind bytes weighted by each kind's count give the saved stack of the whole model to the byte, and its
    end-of-forward and backward-peak live bytes to the byte."""
    _torch()
    profile = tracer.traced_profile(shape_from_config(config, "x"), B, S, attn=attn, target="cpu", config=config)
    _check(profile, _full_depth(build_model(config, "bf16", attn, num_layers=None), grad_ckpt), grad_ckpt)


@pytest.mark.slow
@pytest.mark.parametrize("grad_ckpt", [False, True], ids=["plain", "ckpt"])
@pytest.mark.parametrize("adapters", [Adapters(lora_rank=8, lora_targets="q_b_proj,kv_b_proj,o_proj"),
                                      Adapters(freeze="embeddings,layers:1")], ids=["lora", "freeze-bottom"])
def test_moe_with_adapters_equals_the_full_depth_trace(adapters, grad_ckpt):
    """LoRA on DeepSeek-V3's attention (dense layer 0, MoE above; MLP names would also wrap the fused experts'
    3-D weights, with peft 0.21's ``ParamWrapper`` and ``nn.utils.parametrize``, which cannot run on meta) and a
    frozen bottom: the kinds of structure and of training combine."""
    pytest.importorskip("peft")
    shape = shape_from_config(DEEPSEEK, "x")
    frozen = frozen_base_names(shape, adapters)
    profile = tracer.traced_profile(shape, B, S, target="cpu", config=DEEPSEEK, adapters=adapters, frozen=frozen)
    model = build_trained(DEEPSEEK, "bf16", "sdpa", adapters, grad_ckpt=grad_ckpt, frozen=frozen, num_layers=None)
    _check(profile, _full_depth(model, grad_ckpt), grad_ckpt)


def test_alike_layers_trace_the_two_layer_copy_of_before():
    """No regression: for alike layers the entry is the trace of ``build_model``'s 2-layer copy, and the profile
    is its layer 1 times the depth, with layer 0's extra in the embeddings."""
    torch = _torch()
    config = TINY["llama"]
    entry = tracer.trace_polys(config, "bf16", "sdpa", target="cpu")
    model = build_model(config, "bf16", "sdpa")  # 2 layers
    profile = polys.profile_from_polys(entry, B, S)
    for mode, ckpt in (("plain", False), ("ckpt", True)):
        trace = recorder.run_trace(model, torch.zeros((B, S), dtype=torch.long, device="meta"), grad_ckpt=ckpt,
                                   target="cpu")
        direct = polys.analyze(trace, [{(0, 0): n} for n in trace.sizes])
        regions = {name: polys.evaluate(poly, B, S) for name, poly in entry[mode]["regions"].items()}
        assert regions == {name: polys.evaluate(poly, 1, 1) for name, poly in direct["regions"].items()}
        layer = profile.layer_saved_bytes if mode == "plain" else profile.ckpt_layer_saved_bytes
        embedding = profile.embedding_saved_bytes if mode == "plain" else profile.ckpt_embedding_saved_bytes
        assert layer == regions["layer1"]
        assert profile.stack_bytes(ckpt) == 3 * layer + embedding == regions["embed"] + regions["layer0"] + 2 * layer


@pytest.mark.slow
def test_the_cache_key_holds_the_depth(tmp_path):
    """The layout depends on the depth (deepseek's dense layer is 1 of 3, or 1 of 4): two files."""
    _torch()
    deeper = dict(DEEPSEEK, num_hidden_layers=4)
    three = tracer.traced_profile(shape_from_config(DEEPSEEK, "x"), B, S, target="cpu", config=DEEPSEEK)
    four = tracer.traced_profile(shape_from_config(deeper, "x"), B, S, target="cpu", config=deeper)
    assert len(list((tmp_path / "profiles").glob("*.json"))) == 2
    assert four.all_layers_saved_bytes - three.all_layers_saved_bytes == four.layer_saved_bytes

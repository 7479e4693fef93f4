"""Parameter tensors: ours against HF's ``named_parameters()`` on the meta device, and published totals."""

from __future__ import annotations

import pytest
from zeroest.estimator.catalog.models import list_presets, load_model
from zeroest.estimator.core.architecture import count_params, param_tensors, shape_from_config

# Parameter counts published by the model authors (model cards / papers), or printed by HF for the checkpoint.
PUBLISHED_TOTALS = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "pythia-160m": 162_322_944,
    "pythia-410m": 405_334_016,
    "pythia-1b": 1_011_781_632,
    "pythia-1.4b": 1_414_647_808,
    "pythia-2.8b": 2_775_208_960,
    "pythia-6.9b": 6_857_302_016,
    "pythia-12b": 11_846_072_320,
    "tinyllama-1.1b": 1_100_048_384,
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-3b": 3_085_938_688,
    "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-14b": 14_770_033_664,
    "qwen2.5-32b": 32_763_876_352,
    "qwen2.5-72b": 72_706_203_648,
    "opt-125m": 125_239_296,
    "opt-1.3b": 1_315_758_080,
    "phi-3-mini": 3_821_079_552,
    "gemma-2b": 2_506_172_416,
}

_LLAMA_TINY = dict(
    vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=64,
)
# Small configs that switch on every optional tensor each family has (and some off).
TINY_CONFIGS = {
    "llama-gqa": dict(_LLAMA_TINY, model_type="llama", num_key_value_heads=2),
    "llama-bias": dict(_LLAMA_TINY, model_type="llama", attention_bias=True, mlp_bias=True, head_dim=32),
    "llama-tied": dict(_LLAMA_TINY, model_type="llama", tie_word_embeddings=True),
    "mistral-head-dim": dict(_LLAMA_TINY, model_type="mistral", num_key_value_heads=1, head_dim=8),
    "qwen2-tied": dict(_LLAMA_TINY, model_type="qwen2", num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2-default-kv": dict(_LLAMA_TINY, model_type="qwen2", num_attention_heads=32),  # kv default 32
    "phi3-gqa": dict(_LLAMA_TINY, model_type="phi3", num_key_value_heads=2, pad_token_id=0),
    "gemma-default-head-dim": dict(_LLAMA_TINY, model_type="gemma", num_key_value_heads=1),
    "gemma-bias-untied": dict(  # kv heads: GemmaConfig default 16
        _LLAMA_TINY, model_type="gemma", num_attention_heads=16, head_dim=16, attention_bias=True,
        tie_word_embeddings=False,
    ),
    "mistral-default-kv": dict(_LLAMA_TINY, model_type="mistral", num_attention_heads=8),  # kv default 8
    "gpt2": dict(model_type="gpt2", vocab_size=101, n_embd=64, n_layer=2, n_head=4, n_positions=32),
    "gpt2-inner-untied": dict(
        model_type="gpt2", vocab_size=101, n_embd=64, n_layer=2, n_head=4, n_inner=80,
        tie_word_embeddings=False,
    ),
    "gpt_neox": dict(
        model_type="gpt_neox", vocab_size=101, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4,
    ),
    "gpt_neox-nobias-tied": dict(
        model_type="gpt_neox", vocab_size=101, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, attention_bias=False, tie_word_embeddings=True,
    ),
    "opt": dict(
        model_type="opt", vocab_size=101, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=40, pad_token_id=1,
    ),
    "opt-350m-like": dict(  # project_in/out, post-LN (no final norm), untied
        model_type="opt", vocab_size=101, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=40, word_embed_proj_dim=32, do_layer_norm_before=False,
        tie_word_embeddings=False, pad_token_id=1,
    ),
    "opt-no-bias-no-affine": dict(
        model_type="opt", vocab_size=101, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
        num_attention_heads=4, enable_bias=False, layer_norm_elementwise_affine=False, pad_token_id=1,
    ),
}


def _hf_named_parameters(config: dict) -> list[tuple[str, int]]:
    """``named_parameters()`` of ``AutoModelForCausalLM.from_config`` built on the meta device (no memory)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    return [(name, p.numel()) for name, p in model.named_parameters()]


def _preset_config(name: str) -> dict:
    import json

    from zeroest.estimator.catalog.models import _models_dir

    return json.loads((_models_dir() / f"{name}.json").read_text())


@pytest.mark.parametrize("name", list_presets())
def test_preset_tensors_match_hf(name: str) -> None:
    theirs = _hf_named_parameters(_preset_config(name))
    ours = [(t.name, t.numel) for t in param_tensors(load_model(name))]
    assert ours == theirs
    assert count_params(load_model(name)).total == sum(numel for _, numel in theirs)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tiny_config_tensors_match_hf(name: str) -> None:
    config = TINY_CONFIGS[name]
    theirs = _hf_named_parameters(config)
    ours = [(t.name, t.numel) for t in param_tensors(shape_from_config(config, name))]
    assert ours == theirs


@pytest.mark.parametrize(("name", "total"), sorted(PUBLISHED_TOTALS.items()))
def test_published_totals(name: str, total: int) -> None:
    assert count_params(load_model(name)).total == total


def test_every_preset_has_a_published_total() -> None:
    assert sorted(PUBLISHED_TOTALS) == list_presets()


def test_llama_2_7b_breakdown_from_named_terms() -> None:
    """Llama-2-7B (Touvron et al. 2023; its config.json): V=32000, h=4096, L=32, I=11008, MHA, untied."""
    vocab, h, layers, inter = 32000, 4096, 32, 11008
    parts = count_params(load_model("llama-2-7b"))
    assert parts.embeddings == vocab * h
    assert parts.position_embeddings == 0
    assert parts.attention == layers * 4 * h * h  # q, k, v, o
    assert parts.mlp == layers * 3 * h * inter  # gate, up, down
    assert parts.norms == (2 * layers + 1) * h  # two RMSNorms per layer, final norm
    assert parts.lm_head == vocab * h
    assert parts.total == 6_738_415_616


def test_gpt2_breakdown_from_named_terms() -> None:
    """GPT-2 small: tied lm_head (no tensor), learned positions 1024 x 768, biased Conv1D, LayerNorms."""
    vocab, h, layers, positions = 50257, 768, 12, 1024
    parts = count_params(load_model("gpt2"))
    assert parts.embeddings == vocab * h
    assert parts.position_embeddings == positions * h
    assert parts.attention == layers * (h * 3 * h + 3 * h + h * h + h)
    assert parts.mlp == layers * (h * 4 * h + 4 * h + 4 * h * h + h)
    assert parts.norms == (2 * layers + 1) * 2 * h
    assert parts.lm_head == 0


def test_gqa_kv_projection_width() -> None:
    """Llama-3-8B: 8 kv heads of 128, so k_proj and v_proj are 4096 x 1024."""
    tensors = {t.name: t for t in param_tensors(load_model("llama-3-8b"))}
    assert tensors["model.layers.0.self_attn.k_proj.weight"].numel == 4096 * 8 * 128
    assert tensors["model.layers.0.self_attn.k_proj.weight"].component == "attention"


def test_family_defaults_when_fields_are_absent() -> None:
    gpt2 = shape_from_config(dict(model_type="gpt2", vocab_size=10, n_embd=32, n_layer=1, n_head=4), "g")
    assert (gpt2.intermediate_size, gpt2.max_positions, gpt2.tied_embeddings) == (4 * 32, 1024, True)
    gemma = shape_from_config(dict(TINY_CONFIGS["gemma-default-head-dim"], num_key_value_heads=None), "ge")
    assert (gemma.head_dim, gemma.num_kv_heads, gemma.tied_embeddings) == (256, 4, True)
    llama = shape_from_config(dict(_LLAMA_TINY, model_type="llama"), "l")
    assert (llama.head_dim, llama.num_kv_heads, llama.tied_embeddings) == (16, 4, False)
    qwen2 = shape_from_config(dict(_LLAMA_TINY, model_type="qwen2", num_key_value_heads=None), "q")
    assert qwen2.num_kv_heads == 4  # null, unlike absent, means num_attention_heads
    opt = shape_from_config(TINY_CONFIGS["opt"], "o")
    assert (opt.extra["word_embed_proj_dim"], opt.extra["hidden_act"]) == (64, "relu")
    assert load_model("gemma-2b").extra["hidden_act"] == "gelu_pytorch_tanh"
    assert load_model("gpt2").extra["hidden_act"] == "gelu_new"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (dict(_LLAMA_TINY, model_type="llama", hidden_size=None), "'hidden_size' (nor 'n_embd')"),
        (dict(model_type="gpt2", vocab_size=10, n_layer=1, n_head=4), "'n_embd' (nor 'hidden_size')"),
        (dict(_LLAMA_TINY, model_type="llama", intermediate_size=None), "'intermediate_size'"),
        (dict(_LLAMA_TINY, model_type="bert"), "model_type 'bert'"),
        (dict(_LLAMA_TINY), "no 'model_type'"),
        (dict(_LLAMA_TINY, model_type="llama", num_attention_heads=5), "not divisible by 5 heads"),
        (dict(_LLAMA_TINY, model_type="llama", num_key_value_heads=3), "not a multiple of 3 kv heads"),
        (dict(_LLAMA_TINY, model_type="llama", num_hidden_layers=0), "'num_hidden_layers' must be"),
        (dict(_LLAMA_TINY, model_type="qwen2"), "of 32 kv heads (the qwen2 default"),
        (dict(_LLAMA_TINY, model_type="llama", vocab_size="32000"), "'vocab_size' must be a positive"),
        (dict(TINY_CONFIGS["gpt2"], add_cross_attention=True), "add_cross_attention"),
    ],
)
def test_bad_configs_name_the_field_and_file(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match="foo/config.json") as err:
        shape_from_config(config, "foo/config.json")
    assert message in str(err.value)

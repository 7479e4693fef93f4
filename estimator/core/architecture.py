"""Exact parameter tensors of the supported HF decoder families, from a config.json.

``shape_from_config`` reads an HF ``config.json`` dict into a ``ModelShape``; ``param_tensors`` lists the
tensors of ``AutoModelForCausalLM.from_config(cfg).named_parameters()`` (tied weights appear once, under the
name of the module registered first) with the same names, order and element counts; ``count_params`` sums
them by component.

The per-tensor list matters for memory: ZeRO-3 keeps tensors smaller than
``stage3_param_persistence_threshold`` whole on every rank (deepspeed/runtime/zero/parameter_offload.py,
``_mark_persistent_parameters``) and ZeRO-1/2 pad each flat group to a multiple of the data-parallel degree
(deepspeed/runtime/zero/stage_1_and_2.py, ``flatten_dense_tensors_aligned``).

Sources, transformers 5.24 ``models/<family>/modeling_<family>.py``: the ``__init__`` of each
``*ForCausalLM``, ``*Model``, ``*DecoderLayer``/``*Block``, ``*Attention`` and ``*MLP`` (the order of
``nn.Module`` attribute registration is the order of ``named_parameters``), and
``configuration_<family>.py`` for the defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Literal

from zeroest.estimator.core.arch_gemma import MODEL_TYPES, gemma2_layer, gemma_reader_config, gemma_shape
from zeroest.estimator.core.arch_qwen3_mixtral import MOE_FAMILIES, moe_shape, moe_tensors
from zeroest.estimator.core.shape import FAMILIES, ModelShape

Component = Literal["embeddings", "position_embeddings", "attention", "mlp", "norms", "lm_head"]
COMPONENTS: tuple[str, ...] = ("embeddings", "position_embeddings", "attention", "mlp", "norms", "lm_head")

_MISSING = object()

# Defaults of the HF config classes (transformers 5.24 configuration_<family>.py) for fields commonly left out
# of a config.json. Structural fields (width, depth, heads, vocabulary, MLP width) have no default here: a
# config without them is more likely the wrong file than a model that wants HF's example values.
_MAX_POSITIONS_DEFAULT = {
    "llama": 2048, "mistral": 131072, "qwen2": 32768, "gpt2": 1024,
    "gpt_neox": 2048, "opt": 2048, "phi3": 4096, "gemma": 8192,
}
# ``num_key_value_heads`` left out of config.json takes the class default, which is not always
# num_attention_heads (MistralConfig 8, Qwen2Config 32, GemmaConfig 16); null means num_attention_heads.
_KV_HEADS_DEFAULT = {"mistral": 8, "qwen2": 32, "gemma": 16}
# (config key, class default) of the MLP activation, kept in extra["hidden_act"] for activation memory.
_ACTIVATION = {
    "llama": ("hidden_act", "silu"), "mistral": ("hidden_act", "silu"), "qwen2": ("hidden_act", "silu"),
    "phi3": ("hidden_act", "silu"), "gemma": ("hidden_activation", "gelu_pytorch_tanh"),
    "gpt2": ("activation_function", "gelu_new"), "gpt_neox": ("hidden_act", "gelu"),
    "opt": ("activation_function", "relu"),
}
_TIED_DEFAULT = {
    "llama": False, "mistral": False, "qwen2": False, "gpt2": True,
    "gpt_neox": False, "opt": True, "phi3": False, "gemma": True,
}


@dataclass(frozen=True, kw_only=True)
class ParamTensor:
    """One entry of ``model.named_parameters()``."""

    name: str
    """HF parameter name, e.g. ``model.layers.0.self_attn.q_proj.weight``."""
    numel: int
    """Number of elements."""
    component: Component
    """Which part of the model it belongs to; a bias belongs to its module's component."""
    linear_shape: tuple[int, int] | None = None
    """(out, in) when this is the weight of an ``nn.Linear`` (or gpt2's ``Conv1D``): what a LoRA adapter wraps."""


@dataclass(frozen=True, kw_only=True)
class ParamBreakdown:
    """Parameter counts (elements) per component; the parts sum to ``total``."""

    embeddings: int
    """Token embedding (and opt's ``project_in``/``project_out``)."""
    position_embeddings: int
    """Learned position table (gpt2 ``wpe``, opt ``embed_positions``); 0 for rotary models."""
    attention: int
    """q/k/v/o projections with their biases, all layers."""
    mlp: int
    """MLP projections with their biases, all layers."""
    norms: int
    """Every LayerNorm/RMSNorm weight (and bias)."""
    lm_head: int
    """Output projection; 0 when tied to the token embedding."""

    @property
    def total(self) -> int:
        """Sum of all components: ``sum(p.numel() for p in model.parameters())``."""
        return sum(getattr(self, f.name) for f in fields(self))


def _get(config: dict, name: str, *keys: str, default: object = _MISSING) -> object:
    """First present, non-null ``config[key]``; the default, or a ValueError naming the keys and the file."""
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if default is not _MISSING:
        return default
    alias = f" (nor {', '.join(repr(k) for k in keys[1:])})" if len(keys) > 1 else ""
    raise ValueError(f"config {name!r} has no {keys[0]!r}{alias}: is it a decoder-only causal LM config?")


def _positive_int(config: dict, name: str, *keys: str, default: object = _MISSING) -> int:
    value = _get(config, name, *keys, default=default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"config {name!r}: {keys[0]!r} must be a positive integer, got {value!r}")
    return value


def shape_from_config(config: dict, name: str) -> ModelShape:
    """Build a ``ModelShape`` from the contents of an HF ``config.json``.

    ``name`` is the preset name or file path, used in messages and kept as ``ModelShape.name``. Field names
    and defaults follow transformers 5.24 ``configuration_<model_type>.py``; family-specific fields that
    change the parameter list go to ``ModelShape.extra``.
    """
    family = config.get("model_type")
    supported = ", ".join(FAMILIES)
    if family is None:
        raise ValueError(f"config {name!r} has no 'model_type': is it an HF config.json? ({supported})")
    if family in MOE_FAMILIES:  # qwen3, qwen3_moe, mixtral: written out in core.arch_qwen3_mixtral
        return moe_shape(config, name)
    if family in MODEL_TYPES:  # gemma2, gemma3_text: gemma's reader with their defaults (core.arch_gemma)
        return gemma_shape(shape_from_config(gemma_reader_config(config, name), name), config)
    if family not in FAMILIES:  # any other causal LM: read from transformers (needs the full install)
        from zeroest.estimator.trace.generic import generic_shape

        return generic_shape(config, name)
    gpt2 = family == "gpt2"
    hidden = _positive_int(config, name, *(("n_embd", "hidden_size") if gpt2 else ("hidden_size", "n_embd")))
    layers = _positive_int(config, name, *(("n_layer",) if gpt2 else ()), "num_hidden_layers")
    heads = _positive_int(config, name, *(("n_head",) if gpt2 else ()), "num_attention_heads")
    vocab = _positive_int(config, name, "vocab_size")
    if family in ("gpt2", "gpt_neox", "opt") or config.get("head_dim") is None:
        if family != "gemma" and hidden % heads:
            raise ValueError(f"config {name!r}: hidden size {hidden} is not divisible by {heads} heads")
        head_dim = 256 if family == "gemma" else hidden // heads  # GemmaConfig.head_dim defaults to 256
    else:
        head_dim = _positive_int(config, name, "head_dim")
    if family in ("gpt2", "gpt_neox", "opt"):
        kv_heads = heads
    elif "num_key_value_heads" not in config and family in _KV_HEADS_DEFAULT:
        kv_heads = _KV_HEADS_DEFAULT[family]  # the class default, not num_attention_heads
    else:  # absent or null: num_attention_heads (LlamaConfig.__post_init__ and the like)
        kv_heads = _positive_int(config, name, "num_key_value_heads", default=heads)
    if heads % kv_heads:
        why = "" if "num_key_value_heads" in config else f" (the {family} default for num_key_value_heads)"
        raise ValueError(f"config {name!r}: {heads} heads are not a multiple of {kv_heads} kv heads{why}")
    if gpt2:  # GPT2Block: n_inner None -> 4 * n_embd
        intermediate = _positive_int(config, name, "n_inner", default=4 * hidden)
    elif family == "opt":
        intermediate = _positive_int(config, name, "ffn_dim")
    else:
        intermediate = _positive_int(config, name, "intermediate_size")
    max_positions = _positive_int(
        config, name, *(("n_positions", "max_position_embeddings") if gpt2 else ("max_position_embeddings",)),
        default=_MAX_POSITIONS_DEFAULT[family])
    act_key, act_default = _ACTIVATION[family]
    extra: dict = {"hidden_act": str(config.get(act_key) or config.get("hidden_act") or act_default)}
    attention_bias = family in ("qwen2", "gpt2", "gpt_neox", "opt")
    if family in ("llama", "gemma"):
        attention_bias = bool(config.get("attention_bias", False))
    if family == "llama":
        extra["mlp_bias"] = bool(config.get("mlp_bias", False))
    if family == "gpt_neox":
        attention_bias = bool(config.get("attention_bias", True))
        extra["use_parallel_residual"] = bool(config.get("use_parallel_residual", True))
        extra["rotary_pct"] = float(config.get("rotary_pct", config.get("partial_rotary_factor", 0.25)))
    if family == "opt":
        attention_bias = bool(config.get("enable_bias", True))
        extra["word_embed_proj_dim"] = _positive_int(config, name, "word_embed_proj_dim", default=hidden)
        extra["do_layer_norm_before"] = bool(config.get("do_layer_norm_before", True))
        extra["remove_final_layer_norm"] = bool(config.get("_remove_final_layer_norm", False))
        extra["layer_norm_elementwise_affine"] = bool(config.get("layer_norm_elementwise_affine", True))
    if gpt2 and config.get("add_cross_attention"):
        raise ValueError(f"config {name!r} has add_cross_attention=true: only decoder-only models work")
    return ModelShape(
        name=name,
        family=family,
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        max_positions=max_positions,
        gated_mlp=family not in ("gpt2", "gpt_neox", "opt"),
        tied_embeddings=bool(config.get("tie_word_embeddings", _TIED_DEFAULT[family])),
        norm="layernorm" if family in ("gpt2", "gpt_neox", "opt") else "rmsnorm",
        positions="learned" if family in ("gpt2", "opt") else "rotary",
        attention_bias=attention_bias,
        extra=extra,
    )


_Emit = Callable[..., None]


def _linear(emit: _Emit, name: str, n_in: int, n_out: int, bias: bool, component: str) -> None:
    """``nn.Linear(n_in, n_out, bias)`` (or gpt2's ``Conv1D(n_out, n_in)``): weight, then bias."""
    emit(f"{name}.weight", n_in * n_out, component, (n_out, n_in))
    if bias:
        emit(f"{name}.bias", n_out, component)


def _norm(emit: _Emit, name: str, width: int, with_bias: bool) -> None:
    """RMSNorm (weight) or LayerNorm (weight, bias)."""
    emit(f"{name}.weight", width, "norms")
    if with_bias:
        emit(f"{name}.bias", width, "norms")


def _llama_like_layer(s: ModelShape, emit: _Emit, p: str) -> None:
    """Llama/Mistral/Qwen2/GemmaDecoderLayer (modeling_<family>.py): q, k, v, o; gate, up, down; 2 norms."""
    h, q, kv = s.hidden_size, s.q_hidden_size, s.kv_hidden_size
    qkv_bias = s.attention_bias
    o_bias = s.attention_bias and s.family in ("llama", "gemma")  # Qwen2Attention: o_proj bias=False
    _linear(emit, f"{p}.self_attn.q_proj", h, q, qkv_bias, "attention")
    _linear(emit, f"{p}.self_attn.k_proj", h, kv, qkv_bias, "attention")
    _linear(emit, f"{p}.self_attn.v_proj", h, kv, qkv_bias, "attention")
    _linear(emit, f"{p}.self_attn.o_proj", q, h, o_bias, "attention")
    mlp_bias = bool(s.extra.get("mlp_bias", False)) and s.family == "llama"
    _linear(emit, f"{p}.mlp.gate_proj", h, s.intermediate_size, mlp_bias, "mlp")
    _linear(emit, f"{p}.mlp.up_proj", h, s.intermediate_size, mlp_bias, "mlp")
    _linear(emit, f"{p}.mlp.down_proj", s.intermediate_size, h, mlp_bias, "mlp")
    _norm(emit, f"{p}.input_layernorm", h, False)
    _norm(emit, f"{p}.post_attention_layernorm", h, False)


def _phi3_layer(s: ModelShape, emit: _Emit, p: str) -> None:
    """Phi3DecoderLayer (modeling_phi3.py): ``o_proj`` registered before the fused ``qkv_proj``."""
    h = s.hidden_size
    _linear(emit, f"{p}.self_attn.o_proj", s.q_hidden_size, h, False, "attention")
    _linear(emit, f"{p}.self_attn.qkv_proj", h, s.q_hidden_size + 2 * s.kv_hidden_size, False, "attention")
    _linear(emit, f"{p}.mlp.gate_up_proj", h, 2 * s.intermediate_size, False, "mlp")
    _linear(emit, f"{p}.mlp.down_proj", s.intermediate_size, h, False, "mlp")
    _norm(emit, f"{p}.input_layernorm", h, False)
    _norm(emit, f"{p}.post_attention_layernorm", h, False)


def _gpt2_layer(s: ModelShape, emit: _Emit, p: str) -> None:
    """GPT2Block: ln_1, attn (Conv1D c_attn, c_proj), ln_2, mlp (c_fc, c_proj); Conv1D always has a bias."""
    h = s.hidden_size
    _norm(emit, f"{p}.ln_1", h, True)
    _linear(emit, f"{p}.attn.c_attn", h, 3 * h, True, "attention")
    _linear(emit, f"{p}.attn.c_proj", h, h, True, "attention")
    _norm(emit, f"{p}.ln_2", h, True)
    _linear(emit, f"{p}.mlp.c_fc", h, s.intermediate_size, True, "mlp")
    _linear(emit, f"{p}.mlp.c_proj", s.intermediate_size, h, True, "mlp")


def _gpt_neox_layer(s: ModelShape, emit: _Emit, p: str) -> None:
    """GPTNeoXLayer: both LayerNorms, then attention (query_key_value, dense), then MLP (always biased)."""
    h = s.hidden_size
    _norm(emit, f"{p}.input_layernorm", h, True)
    _norm(emit, f"{p}.post_attention_layernorm", h, True)
    _linear(emit, f"{p}.attention.query_key_value", h, 3 * h, s.attention_bias, "attention")
    _linear(emit, f"{p}.attention.dense", h, h, s.attention_bias, "attention")
    _linear(emit, f"{p}.mlp.dense_h_to_4h", h, s.intermediate_size, True, "mlp")
    _linear(emit, f"{p}.mlp.dense_4h_to_h", s.intermediate_size, h, True, "mlp")


def _opt_layer(s: ModelShape, emit: _Emit, p: str) -> None:
    """OPTDecoderLayer: k, v, q, out_proj; self_attn_layer_norm; fc1, fc2; final_layer_norm."""
    h, bias = s.hidden_size, s.attention_bias
    affine = bool(s.extra.get("layer_norm_elementwise_affine", True))
    for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
        _linear(emit, f"{p}.self_attn.{proj}", h, h, bias, "attention")
    if affine:
        _norm(emit, f"{p}.self_attn_layer_norm", h, True)
    _linear(emit, f"{p}.fc1", h, s.intermediate_size, bias, "mlp")
    _linear(emit, f"{p}.fc2", s.intermediate_size, h, bias, "mlp")
    if affine:
        _norm(emit, f"{p}.final_layer_norm", h, True)


def _opt_decoder(s: ModelShape, emit: _Emit) -> None:
    """OPTDecoder.__init__: embeddings, positions (+2 rows: OPTLearnedPositionalEmbedding.offset),
    projections, final norm, then the layers; lm_head of width ``word_embed_proj_dim``."""
    h, proj = s.hidden_size, int(s.extra.get("word_embed_proj_dim", s.hidden_size))
    emit("model.decoder.embed_tokens.weight", s.vocab_size * proj, "embeddings")
    emit("model.decoder.embed_positions.weight", (s.max_positions + 2) * h, "position_embeddings")
    if proj != h:
        _linear(emit, "model.decoder.project_out", h, proj, False, "embeddings")
        _linear(emit, "model.decoder.project_in", proj, h, False, "embeddings")
    final_norm = s.extra.get("do_layer_norm_before", True) and not s.extra.get("remove_final_layer_norm")
    if final_norm and s.extra.get("layer_norm_elementwise_affine", True):
        _norm(emit, "model.decoder.final_layer_norm", h, True)
    for i in range(s.num_layers):
        _opt_layer(s, emit, f"model.decoder.layers.{i}")
    if not s.tied_embeddings:
        emit("lm_head.weight", s.vocab_size * proj, "lm_head")


_LAYER = {
    "llama": _llama_like_layer, "mistral": _llama_like_layer, "qwen2": _llama_like_layer,
    "gemma": _llama_like_layer, "phi3": _phi3_layer, "gpt2": _gpt2_layer, "gpt_neox": _gpt_neox_layer,
    "gemma2": gemma2_layer, "gemma3_text": gemma2_layer,
}


def _tensors(s: ModelShape) -> tuple[ParamTensor, ...]:
    out: list[ParamTensor] = []

    def emit(name: str, numel: int, component: str, linear_shape: tuple[int, int] | None = None) -> None:
        out.append(ParamTensor(name=name, numel=numel, component=component, linear_shape=linear_shape))

    h, vocab = s.hidden_size, s.vocab_size
    if s.family == "opt":
        _opt_decoder(s, emit)
        return tuple(out)
    if s.family == "gpt2":
        emit("transformer.wte.weight", vocab * h, "embeddings")
        emit("transformer.wpe.weight", s.max_positions * h, "position_embeddings")
        prefix, final = "transformer.h", "transformer.ln_f"
    elif s.family == "gpt_neox":
        emit("gpt_neox.embed_in.weight", vocab * h, "embeddings")
        prefix, final = "gpt_neox.layers", "gpt_neox.final_layer_norm"
    else:
        emit("model.embed_tokens.weight", vocab * h, "embeddings")
        prefix, final = "model.layers", "model.norm"
    layer = _LAYER[s.family]
    for i in range(s.num_layers):
        layer(s, emit, f"{prefix}.{i}")
    _norm(emit, final, h, s.norm == "layernorm")
    if not s.tied_embeddings:
        emit("lm_head.weight", vocab * h, "lm_head", (vocab, h))
    return tuple(out)


@lru_cache(maxsize=1024)
def param_tensors(shape: ModelShape) -> tuple[ParamTensor, ...]:
    """The tensors of ``AutoModelForCausalLM.from_config(cfg).named_parameters()``, in order.

    Names, order and ``numel`` match transformers 5.24 for every family in ``FAMILIES`` and in
    ``arch_qwen3_mixtral.MOE_FAMILIES`` (qwen3, qwen3_moe, mixtral: their rows); a tied lm_head is
    left out, as ``named_parameters`` (``remove_duplicate=True``) leaves it out. Any other family is read off
    the model built on the meta device (``trace.generic.meta_param_tensors``, torch imported there).
    """
    if shape.family in MOE_FAMILIES:
        return tuple(ParamTensor(name=n, numel=k, component=c, linear_shape=ls) for n, k, c, ls in moe_tensors(shape))
    if shape.family not in FAMILIES:
        if not isinstance(shape.extra.get("config"), dict):
            raise ValueError(f"model {shape.name!r} has family {shape.family!r} and no config.json to build it from")
        from zeroest.estimator.trace.generic import meta_param_tensors

        return tuple(ParamTensor(name=n, numel=k, component=c, linear_shape=ls)
                     for n, k, c, ls in meta_param_tensors(shape))
    return _tensors(shape)


@lru_cache(maxsize=1024)
def count_params(shape: ModelShape) -> ParamBreakdown:
    """Parameter counts per component, summed from ``param_tensors(shape)``."""
    sums = dict.fromkeys(COMPONENTS, 0)
    for tensor in param_tensors(shape):
        sums[tensor.component] += tensor.numel
    return ParamBreakdown(**sums)

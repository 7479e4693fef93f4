"""gemma2 and gemma3 (text): the config defaults and the decoder layer's parameter tensors.

``core.architecture`` reads these families with gemma's reader (``gemma_reader_config`` fills the defaults that
differ from ``GemmaConfig``'s) and lists their layers with ``gemma2_layer``; the rest of the model (scaled token
embedding, ``model.norm``, a tied or untied ``lm_head``) registers as gemma's does. The shape keeps the config.json
verbatim in ``extra["config"]``: the activations (``core.closed_form_gemma``) read its layer types, sliding window
and softcapping from it.

Sources, transformers 5.24: ``models/gemma2/configuration_gemma2.py`` (``Gemma2Config``) and
``models/gemma3/configuration_gemma3.py`` (``Gemma3TextConfig``) for the defaults; ``Gemma2DecoderLayer`` and
``Gemma3DecoderLayer`` (``modeling_gemma2.py``, ``modeling_gemma3.py``) register ``self_attn`` (q, k, v, o, then
gemma3's ``q_norm`` and ``k_norm`` of width head_dim), ``mlp`` (gate, up, down), then four RMSNorms: input,
post_attention, pre_feedforward, post_feedforward.
"""

from __future__ import annotations

from dataclasses import replace

from zeroest.estimator.core.shape import ModelShape

GEMMA_FAMILIES: tuple[str, ...] = ("gemma2", "gemma3_text")
"""The model_types written out here (their ``*ForCausalLM`` is ``Gemma2ForCausalLM``, ``Gemma3ForCausalLM``)."""
MODEL_TYPES: tuple[str, ...] = (*GEMMA_FAMILIES, "gemma3")
"""What ``gemma_reader_config`` answers for: the two families, and the multimodal gemma3 it refuses."""

_DEFAULTS: dict[str, dict] = {
    "gemma2": dict(num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                   hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True),
    "gemma3_text": dict(num_key_value_heads=4, head_dim=256, max_position_embeddings=131072,
                        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True),
}
"""``Gemma2Config`` / ``Gemma3TextConfig`` class defaults of the fields a config.json may leave out and gemma's
reader would otherwise fill with ``GemmaConfig``'s (16 kv heads)."""
_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


def gemma_reader_config(config: dict, name: str) -> dict:
    """``config`` as gemma's reader takes it: model_type "gemma" and this family's defaults where it has none.

    A multimodal ``gemma3`` config is refused in one line: ``AutoModelForCausalLM.from_config`` builds
    ``Gemma3ForConditionalGeneration`` for it (modeling_auto.py ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``), a SigLIP
    vision tower and projector beside the text model, which is not a decoder-only causal LM.
    """
    family = config["model_type"]
    if family == "gemma3":
        raise ValueError(f"config {name!r} is a multimodal gemma3 (Gemma3ForConditionalGeneration, with a vision "
                         "tower): save its 'text_config' as a config.json with model_type 'gemma3_text' and pass that")
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads:  # validate_architecture
        raise ValueError(f"config {name!r}: hidden size {hidden} is not divisible by {heads} heads "
                         f"({family}'s config requires it)")
    filled = {k: v for k, v in _DEFAULTS[family].items() if config.get(k) is None}
    return {**config, **filled, "model_type": "gemma"}


def gemma_shape(read: ModelShape, config: dict) -> ModelShape:
    """The shape gemma's reader made from ``gemma_reader_config``, as the family it is, config.json kept."""
    return replace(read, family=config["model_type"], extra={**read.extra, "config": dict(config)})


def gemma2_layer(s: ModelShape, emit, p: str) -> None:
    """Gemma2DecoderLayer / Gemma3DecoderLayer: q, k, v, o (``attention_bias`` on all four), gemma3's q_norm and
    k_norm, gate, up, down (no bias), then the four RMSNorms of width h."""
    h, d, i, bias = s.hidden_size, s.head_dim, s.intermediate_size, s.attention_bias
    for proj, n_in, n_out in (("q_proj", h, s.q_hidden_size), ("k_proj", h, s.kv_hidden_size),
                              ("v_proj", h, s.kv_hidden_size), ("o_proj", s.q_hidden_size, h)):
        emit(f"{p}.self_attn.{proj}.weight", n_in * n_out, "attention", (n_out, n_in))
        if bias:
            emit(f"{p}.self_attn.{proj}.bias", n_out, "attention")
    if s.family == "gemma3_text":
        emit(f"{p}.self_attn.q_norm.weight", d, "norms")
        emit(f"{p}.self_attn.k_norm.weight", d, "norms")
    for proj, n_in, n_out in (("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)):
        emit(f"{p}.mlp.{proj}.weight", n_in * n_out, "mlp", (n_out, n_in))
    for norm in _NORMS:
        emit(f"{p}.{norm}.weight", h, "norms")

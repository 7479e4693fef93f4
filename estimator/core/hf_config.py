"""A ``ModelShape`` back to the HF config.json dict that the activation profiles read.

The closed form (``core.closed_form``) reads the config's activation, dropout, rotary fraction and sliding
window; the tracer (``trace.model``) builds the HF model from it. A shape built from a config.json keeps it in
``extra["config"]``; otherwise it is rebuilt here from the shape's fields, the family's key names and HF's
defaults (transformers 5.24 ``configuration_<family>.py``), which match the published checkpoints' configs.
"""

from __future__ import annotations

from zeroest.estimator.core.shape import ModelShape

EXTRA_KEYS = (
    "hidden_act", "activation_function", "hidden_activation", "sliding_window", "use_sliding_window",
    "mlp_bias",
    "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout", "attention_dropout", "hidden_dropout",
    "activation_dropout", "partial_rotary_factor", "rope_theta", "rope_scaling",
)
"""``ModelShape.extra`` keys copied by ``hf_config`` into a rebuilt config: they change saved activations."""

_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings")
_FIELD_KEYS: dict[str, tuple[str, ...]] = {
    "gpt2": ("n_embd", "n_inner", "n_layer", "n_head", "n_positions"),
    "opt": ("hidden_size", "ffn_dim", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"),
}
"""Config keys of the shape's hidden_size, intermediate_size, num_layers, num_heads and max_positions, per
family (``_KEYS`` for the others): ``GPT2Config``'s and ``OPTConfig``'s own names."""
_BIAS_KEY = {"opt": "enable_bias", "gpt_neox": "attention_bias", "llama": "attention_bias", "gemma": "attention_bias"}
"""The config key of ``attention_bias`` for the families whose config has one."""


def layers_key(family: str) -> str:
    """The config key of the decoder depth: ``n_layer`` for gpt2, ``num_hidden_layers`` for the others."""
    return _FIELD_KEYS.get(family, _KEYS)[2]


def _family_keys(s: ModelShape) -> dict:
    """What one family's config needs beyond the shared fields: opt's projection and norm switches, neox's
    rotary fraction and parallel residual, the kv heads and head width of the rest, phi3's pad id."""
    x = s.extra
    if s.family == "opt":
        return dict(word_embed_proj_dim=x.get("word_embed_proj_dim", s.hidden_size),
                    do_layer_norm_before=x.get("do_layer_norm_before", True),
                    _remove_final_layer_norm=x.get("remove_final_layer_norm", False),
                    layer_norm_elementwise_affine=x.get("layer_norm_elementwise_affine", True))
    if s.family == "gpt_neox":
        return dict(rotary_pct=x.get("rotary_pct", 0.25), use_parallel_residual=x.get("use_parallel_residual", True))
    if s.family == "gpt2":
        return {}
    cfg: dict = dict(num_key_value_heads=s.num_kv_heads, head_dim=s.head_dim)
    if s.family == "phi3":  # Phi3Config's default pad id 32000 must lie inside the vocabulary
        cfg["pad_token_id"] = None if s.vocab_size <= 32000 else 32000
    return cfg


def hf_config(shape: ModelShape) -> dict:
    """The HF config.json dict of ``shape``: ``shape.extra["config"]`` if present, else rebuilt from fields.

    Rebuilt configs take from ``shape.extra`` the keys in ``EXTRA_KEYS`` when present (activation, dropout
    probabilities, sliding window, rotary fraction, ...) and otherwise keep HF's defaults for the family.
    """
    if isinstance(shape.extra.get("config"), dict):
        return dict(shape.extra["config"])
    s = shape
    cfg: dict = {"model_type": s.family, "vocab_size": s.vocab_size, "tie_word_embeddings": s.tied_embeddings}
    values = (s.hidden_size, s.intermediate_size, s.num_layers, s.num_heads, s.max_positions)
    cfg.update(zip(_FIELD_KEYS.get(s.family, _KEYS), values, strict=True))
    if s.family in _BIAS_KEY:
        cfg[_BIAS_KEY[s.family]] = s.attention_bias
    cfg.update(_family_keys(s))
    cfg.update({key: s.extra[key] for key in EXTRA_KEYS if key in s.extra})
    return cfg

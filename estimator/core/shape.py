"""The shape of a decoder-only transformer: what the estimator needs to know about a model.

One frozen ``ModelShape`` describes any HF causal LM: the families written out here (llama, mistral, qwen2, gpt2,
gpt_neox, opt, phi3, gemma, gemma2, gemma3_text; qwen3, qwen3_moe and mixtral in ``core.arch_qwen3_mixtral``) or any
other read off the model on the meta device (``trace.generic``). ``core.architecture`` builds it from a
config.json and lists its parameter tensors exactly as HF's ``named_parameters()`` does; ``catalog.models`` builds
it from a preset name or a bare parameter count.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

Family = Literal["llama", "mistral", "qwen2", "gpt2", "gpt_neox", "opt", "phi3", "gemma", "gemma2", "gemma3_text"]
FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2", "gpt2", "gpt_neox", "opt", "phi3", "gemma", "gemma2",
                             "gemma3_text")


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """A decoder-only transformer, in the terms HF's config.json uses."""

    name: str
    """Preset name, config path or ``"<count> (standard shape)"``: what the user asked for."""
    family: Family
    """HF ``model_type``; decides which parameter tensors exist."""
    vocab_size: int
    """Rows of the token embedding (``config.vocab_size``)."""
    hidden_size: int
    """Model width h (``hidden_size`` / ``n_embd`` / ``d_model``)."""
    num_layers: int
    """Decoder layers L (``num_hidden_layers`` / ``n_layer``)."""
    num_heads: int
    """Query heads a (``num_attention_heads`` / ``n_head``)."""
    num_kv_heads: int
    """Key/value heads (GQA); equals ``num_heads`` for multi-head attention."""
    head_dim: int
    """Per-head width; ``hidden_size // num_heads`` unless the config says otherwise (gemma: 256)."""
    intermediate_size: int
    """MLP inner width (``intermediate_size`` / ``n_inner`` / ``ffn_dim``)."""
    max_positions: int
    """``max_position_embeddings`` / ``n_positions``: longest sequence the model is built for."""
    gated_mlp: bool
    """True for SwiGLU/GeGLU MLPs (gate, up, down projections); False for two-matrix MLPs."""
    tied_embeddings: bool
    """lm_head shares the token embedding's weight (``tie_word_embeddings``)."""
    norm: Literal["rmsnorm", "layernorm"]
    """RMSNorm (weight only, upcast to fp32 inside) or LayerNorm (weight and bias)."""
    positions: Literal["rotary", "learned"]
    """Rotary embeddings (no parameters) or a learned position table (gpt2, opt)."""
    attention_bias: bool = False
    """q/k/v projections carry a bias (qwen2, gpt2, gpt_neox, opt)."""
    nominal_params: int | None = None
    """The parameter count the user asked for (``--params 7.5B``) when the shape stands in for it; paper mode uses
    it as Psi. The shape's own exact count is within 0.5% of it."""
    extra: dict = field(default_factory=dict)
    """Family-specific fields the parameter list needs (e.g. opt's ``word_embed_proj_dim``), kept verbatim;
    scalars only, so that shapes hash and compare with them."""

    def __hash__(self) -> int:
        plain = tuple(getattr(self, f.name) for f in fields(self) if f.name != "extra")
        return hash((plain, tuple(sorted((k, repr(v)) for k, v in self.extra.items()))))

    @property
    def kv_hidden_size(self) -> int:
        """Width of the k (and of the v) projection output: ``num_kv_heads * head_dim``."""
        return self.num_kv_heads * self.head_dim

    @property
    def q_hidden_size(self) -> int:
        """Width of the q projection output: ``num_heads * head_dim``."""
        return self.num_heads * self.head_dim

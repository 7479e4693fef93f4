"""Exact parameter tensors of qwen3, qwen3_moe and mixtral, from a config.json, without torch.

``moe_shape`` reads the config into a ``ModelShape`` (the config.json dict kept in ``extra["config"]``, as the
tracer and ``core.closed_form_moe`` read it); ``moe_tensors`` lists ``AutoModelForCausalLM.from_config(cfg)
.named_parameters()`` as (name, numel, component) rows, in order; ``core.architecture`` wraps them. Components
follow ``trace.generic.component_of`` (``q_norm``/``k_norm`` are norms, the router ``gate`` and the experts are
mlp), so the traced and the closed-form paths split a model alike. The weight of each ``nn.Linear`` (q, k, v, o,
the dense MLP's gate/up/down, lm_head) carries its (out, in): what peft's ``all-linear`` wraps and QLoRA
quantises. The routers (``MixtralTopKRouter``, ``Qwen3MoeTopKRouter``: a bare ``weight`` Parameter) and the fused
3-D experts are no ``nn.Linear`` and carry none (``core.adapters`` says what peft does with them).

Sources, transformers 5.24:
- qwen3/modeling_qwen3.py: ``Qwen3Attention.__init__`` registers q, k, v, o (all with ``attention_bias``, o
  too), then ``q_norm`` and ``k_norm``, RMSNorms of ``head_dim``; ``Qwen3DecoderLayer``: self_attn, mlp (gate,
  up, down without bias), input_layernorm, post_attention_layernorm. configuration_qwen3.py: ``head_dim`` 128,
  ``tie_word_embeddings`` False, ``attention_bias`` False, ``num_key_value_heads`` 32 (null: the heads).
- mixtral/modeling_mixtral.py: ``MixtralAttention`` (q, k, v, o without bias), ``MixtralSparseMoeBlock``
  registers ``gate`` (``MixtralTopKRouter.weight`` (E, h)) then ``experts`` (``MixtralExperts``: the fused 3-D
  ``gate_up_proj`` (E, 2i, h) and ``down_proj`` (E, h, i), no per-expert Linear). configuration_mixtral.py:
  ``num_local_experts`` 8, ``num_experts_per_tok`` 2, ``num_key_value_heads`` 8, ``head_dim`` None
  (h / heads), ``max_position_embeddings`` 131072.
- qwen3_moe/modeling_qwen3_moe.py: qwen3's attention; ``Qwen3MoeSparseMoeBlock`` registers ``experts`` (E,
  ``moe_intermediate_size``) before ``gate``; a layer is sparse when it is not in ``mlp_only_layers`` and
  ``(layer + 1) % decoder_sparse_step == 0`` (and ``num_experts`` > 0), else a dense ``Qwen3MoeMLP`` of
  ``intermediate_size``. configuration_qwen3_moe.py: no ``head_dim`` field (h / heads unless config.json has
  one), ``num_experts`` 128, ``num_experts_per_tok`` 8, ``moe_intermediate_size`` 768, ``num_key_value_heads``
  4, ``norm_topk_prob`` False.
"""

from __future__ import annotations

from zeroest.estimator.core.shape import ModelShape

MOE_FAMILIES: tuple[str, ...] = ("qwen3", "qwen3_moe", "mixtral")
"""The families this module writes out (besides ``core.shape.FAMILIES``)."""

_DEFAULTS = {
    "qwen3": dict(num_key_value_heads=32, head_dim=128, max_position_embeddings=32768),
    "qwen3_moe": dict(num_key_value_heads=4, max_position_embeddings=32768, num_experts=128, num_experts_per_tok=8,
                      moe_intermediate_size=768, decoder_sparse_step=1, intermediate_size=6144),
    "mixtral": dict(num_key_value_heads=8, max_position_embeddings=131072, num_local_experts=8,
                    num_experts_per_tok=2),
}
"""The config classes' defaults (transformers 5.24 configuration_<family>.py) for fields config.json may leave
out. Width, depth, heads, vocabulary and MLP width have none here, as in ``core.architecture``, but for
qwen3_moe's dense ``intermediate_size`` (6144), which a model of sparse layers only never uses."""

Row = tuple[str, int, str, tuple[int, int] | None]
"""(name, numel, component, the (out, in) of an ``nn.Linear``'s weight or None)."""


def _int(config: dict, name: str, key: str, family: str, *, zero: bool = False) -> int:
    """``config[key]`` (or the family default) as a positive integer (or >= 0); a one-line ValueError."""
    value = config.get(key)
    if value is None:
        value = _DEFAULTS[family].get(key)
    if value is None:
        raise ValueError(f"config {name!r} has no {key!r}: is it a decoder-only causal LM config?")
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero else 1):
        raise ValueError(f"config {name!r}: {key!r} must be a {'non-negative' if zero else 'positive'} integer, "
                         f"got {value!r}")
    return value


def sparse_layers(family: str, config: dict, num_layers: int) -> tuple[int, ...]:
    """The decoder layers with routed experts: every mixtral layer; qwen3_moe's rule
    (``Qwen3MoeDecoderLayer.__init__``): not in ``mlp_only_layers``, ``(i + 1) % decoder_sparse_step == 0``."""
    if family == "mixtral":
        return tuple(range(num_layers))
    if family != "qwen3_moe" or not config.get("num_experts", _DEFAULTS[family]["num_experts"]):
        return ()
    step = config.get("decoder_sparse_step") or _DEFAULTS[family]["decoder_sparse_step"]
    dense = set(config.get("mlp_only_layers") or ())
    return tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)


def moe_shape(config: dict, name: str) -> ModelShape:
    """The ``ModelShape`` of a qwen3, qwen3_moe or mixtral config.json; ``extra`` keeps the config itself and
    the experts' counts (``num_experts`` E, ``top_k`` k, ``expert_size`` i_e, ``sparse_layers``)."""
    family = config["model_type"]
    hidden = _int(config, name, "hidden_size", family)
    heads = _int(config, name, "num_attention_heads", family)
    kv_heads = config.get("num_key_value_heads", _DEFAULTS[family]["num_key_value_heads"])
    kv_heads = heads if kv_heads is None else _int({"num_key_value_heads": kv_heads}, name, "num_key_value_heads",
                                                   family)
    if heads % kv_heads:
        raise ValueError(f"config {name!r}: {heads} heads are not a multiple of {kv_heads} kv heads")
    if config.get("head_dim") is not None or "head_dim" in _DEFAULTS[family]:
        head_dim = _int(config, name, "head_dim", family)
    elif hidden % heads:
        raise ValueError(f"config {name!r}: hidden size {hidden} is not divisible by {heads} heads")
    else:
        head_dim = hidden // heads
    layers = _int(config, name, "num_hidden_layers", family)
    extra: dict = {"config": dict(config), "hidden_act": str(config.get("hidden_act") or "silu")}
    if family != "qwen3":
        experts_key = "num_local_experts" if family == "mixtral" else "num_experts"
        extra["num_experts"] = _int(config, name, experts_key, family, zero=family == "qwen3_moe")
        extra["top_k"] = _int(config, name, "num_experts_per_tok", family)
        extra["expert_size"] = _int(config, name, "intermediate_size" if family == "mixtral" else
                                    "moe_intermediate_size", family)
        extra["sparse_layers"] = sparse_layers(family, config, layers)
        if extra["sparse_layers"] and extra["top_k"] > extra["num_experts"]:
            raise ValueError(f"config {name!r}: num_experts_per_tok {extra['top_k']} is more than the "
                             f"{extra['num_experts']} experts")
    return ModelShape(
        name=name, family=family, vocab_size=_int(config, name, "vocab_size", family), hidden_size=hidden,
        num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        intermediate_size=_int(config, name, "intermediate_size", family),
        max_positions=_int(config, name, "max_position_embeddings", family), gated_mlp=True,
        tied_embeddings=bool(config.get("tie_word_embeddings", False)), norm="rmsnorm", positions="rotary",
        attention_bias=family != "mixtral" and bool(config.get("attention_bias", False)), extra=extra,
    )


def _linear(rows: list[Row], name: str, n_in: int, n_out: int, bias: bool, component: str) -> None:
    rows.append((f"{name}.weight", n_in * n_out, component, (n_out, n_in)))
    if bias:
        rows.append((f"{name}.bias", n_out, component, None))


def _layer(s: ModelShape, rows: list[Row], i: int) -> None:
    """One decoder layer: attention (q, k, v, o; qwen3's q/k norms), the MLP or the sparse block, two norms."""
    p, h, x = f"model.layers.{i}", s.hidden_size, s.extra
    for proj, n_in, n_out in (("q_proj", h, s.q_hidden_size), ("k_proj", h, s.kv_hidden_size),
                              ("v_proj", h, s.kv_hidden_size), ("o_proj", s.q_hidden_size, h)):
        _linear(rows, f"{p}.self_attn.{proj}", n_in, n_out, s.attention_bias, "attention")
    if s.family != "mixtral":
        rows.append((f"{p}.self_attn.q_norm.weight", s.head_dim, "norms", None))
        rows.append((f"{p}.self_attn.k_norm.weight", s.head_dim, "norms", None))
    if i in x.get("sparse_layers", ()):
        e, ie = x["num_experts"], x["expert_size"]
        router = [(f"{p}.mlp.gate.weight", e * h, "mlp", None)]
        experts = [(f"{p}.mlp.experts.gate_up_proj", e * 2 * ie * h, "mlp", None),
                   (f"{p}.mlp.experts.down_proj", e * h * ie, "mlp", None)]
        rows.extend(router + experts if s.family == "mixtral" else experts + router)
    else:
        for proj, n_in, n_out in (("gate_proj", h, s.intermediate_size), ("up_proj", h, s.intermediate_size),
                                  ("down_proj", s.intermediate_size, h)):
            _linear(rows, f"{p}.mlp.{proj}", n_in, n_out, False, "mlp")
    rows.append((f"{p}.input_layernorm.weight", h, "norms", None))
    rows.append((f"{p}.post_attention_layernorm.weight", h, "norms", None))


def moe_tensors(s: ModelShape) -> list[Row]:
    """(name, numel, component, Linear shape) of every ``named_parameters()`` entry of ``s``'s model; a tied
    lm_head is left out, as ``named_parameters(remove_duplicate=True)`` leaves it out."""
    rows: list[Row] = [("model.embed_tokens.weight", s.vocab_size * s.hidden_size, "embeddings", None)]
    for i in range(s.num_layers):
        _layer(s, rows, i)
    rows.append(("model.norm.weight", s.hidden_size, "norms", None))
    if not s.tied_embeddings:
        rows.append(("lm_head.weight", s.vocab_size * s.hidden_size, "lm_head", (s.vocab_size, s.hidden_size)))
    return rows

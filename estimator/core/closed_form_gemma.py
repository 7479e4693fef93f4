"""Closed-form activations of gemma2 and gemma3 (text): gemma's layer, plus what their extra modules save.

``gemma_profile`` builds on gemma's closed form (``core.closed_form``, passed in as ``base`` so that this module
imports nothing of it), evaluated once per layer type (sliding, full) with that type's attention, and adds the
terms of transformers 5.24 ``modeling_gemma2.py`` / ``modeling_gemma3.py`` that gemma (v1) lacks:

* ``post_attention_layernorm`` and ``post_feedforward_layernorm`` (``Gemma2RMSNorm.forward``:
  ``_norm(x.float()) * (1.0 + weight.float())``, then ``type_as``): each saves the fp32 upcast 4T*h (``pow``
  and ``x * rsqrt``), the fp32 rstd 4T (``rsqrt``), the fp32 normalized value 4T*h and the fp32 ``1 + weight``
  4h (the product's two inputs); their output goes to the residual add, which saves nothing;
* gemma3's ``q_norm`` and ``k_norm`` (the same norm over head_dim): 8T*q_w + 4T*a + 4d and 8T*kv_w + 4T*a_kv +
  4d, with q_w = a*d and kv_w = a_kv*d the q and kv widths;
* eager attention with ``attn_logit_softcapping`` (gemma2's ``eager_attention_forward``: scores / c, ``tanh``,
  * c): ``tanh`` saves its output, p*b*a*s^2 (the divisions and products by a number save nothing); gemma3's
  attention never passes ``softcap``, so its scores are gemma's;
* ``final_logit_softcapping`` on the logits (``Gemma2ForCausalLM.forward``): ``tanh`` saves its output, p*T*V;
* gemma3's two rotary tables (``Gemma3TextModel.forward``: cos and sin per layer type present), 2p*s*d each;
* the masks (``create_causal_mask`` and ``create_sliding_window_causal_mask``, one tensor per layer type present):
  under checkpointing each is a layer argument kept once, eager's p*b*s^2 additive mask and sdpa's 1-byte
  sliding mask (s >= window; a full layer's sdpa mask is None, causal in the kernel).

Layers of a type differ only where their attention does: sdpa with s >= window gives the sliding layers an
explicit mask (k and v repeated to all heads, the additive bias saved; with one kv head, as gemma-3-1b has,
``repeat_kv``'s expand and reshape is a view and the kernel keeps the unrepeated k and v, 2p*T*(q_w - kv_w) less
than repeated ones); the profile sums the layers over their types, and its per-layer and transient terms are the
larger type's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from zeroest.estimator.core.arch_gemma import GEMMA_FAMILIES
from zeroest.estimator.core.profile import DTYPE_BYTES, ActivationProfile
from zeroest.estimator.core.shape import ModelShape

__all__ = ["GEMMA_FAMILIES", "gemma_profile", "layer_types"]

_SOFTCAP_DEFAULT = {"gemma2": (50.0, 30.0), "gemma3_text": (None, None)}
"""(attn_logit_softcapping, final_logit_softcapping) class defaults (Gemma2Config, Gemma3TextConfig)."""
_WINDOW_DEFAULT = 4096
"""``sliding_window`` default of both config classes."""


def layer_types(family: str, config: dict, num_layers: int) -> list[str]:
    """``config.layer_types``, or the config class's default: gemma2 alternates sliding and full layers from a
    sliding one (``Gemma2Config.__post_init__``); gemma3 makes every ``sliding_window_pattern``-th (6) layer full
    (``Gemma3TextConfig.__post_init__``)."""
    given = config.get("layer_types")
    if given:
        return [str(t) for t in given[:num_layers]]
    every = 2 if family == "gemma2" else int(config.get("sliding_window_pattern") or 6)
    return ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(num_layers)]


def _check(shape: ModelShape, attn: str, config: dict, adapters) -> None:
    """One-line errors for what is not a causal LM, not buildable, or not written out here."""
    if config.get("use_bidirectional_attention"):
        raise ValueError(f"model {shape.name!r} has use_bidirectional_attention=true (an encoder, not a causal "
                         "LM): only causal attention is modelled")
    if shape.family == "gemma2" and attn == "sdpa":
        raise ValueError(f"model {shape.name!r} is gemma2, which has no sdpa attention in transformers 5.24 "
                         "(Gemma2PreTrainedModel._supports_sdpa is False: softcapping): use --attn eager or flash")
    if adapters is not None and adapters.lora:
        raise ValueError(f"model {shape.name!r} ({shape.family}) with LoRA has no closed-form activations: install "
                         "zeroest[validate] for the traced profile (--activations traced)")


def _layer_extra(shape: ModelShape, T: int, p: int, bas2: int, softcap: bool) -> int:  # noqa: N803
    """Saved bytes a gemma2/3 layer adds to a gemma layer of the same widths (module docstring): the two post
    norms 2(8T*h + 4T + 4h), gemma3's q/k norms, eager gemma2's softcap ``tanh`` output p*b*a*s^2."""
    h, d = shape.hidden_size, shape.head_dim
    extra = 2 * (8 * T * h + 4 * T + 4 * h)
    if shape.family == "gemma3_text":
        extra += 8 * T * shape.q_hidden_size + 4 * T * shape.num_heads + 4 * d
        extra += 8 * T * shape.kv_hidden_size + 4 * T * shape.num_kv_heads + 4 * d
    return extra + (p * bas2 if softcap else 0)


def _transients(per_type: dict[str, ActivationProfile], T: int, h: int, p: int,  # noqa: N803
                live_masks: int) -> dict[str, int]:
    """The layers' transients over gemma's (the larger layer type's), fitted to the traced op order
    (estimator/trace/, full depth: tests/test_gemma_closed_form.py) and bounding it from above.

    Forward: the post-attention norm's fp32 temporaries beside the residual, 4T*h more, and eager's second mask
    (both ``causal_mask_mapping`` entries live through the model's forward), p*b*s^2; checkpointed, the residual
    branch's p*T*h. Backward: the post-feedforward norm's backward first (``Gemma2RMSNorm``'s fp32 chain:
    grad_hidden plus four fp32 T*h tensors, less the freed rstd 4T and ``1 + weight`` 4h), or gemma's peaks with
    the residual branch's gradient p*T*h and the fp32 weight-gradient row 4h beside them.
    """
    def top(name: str) -> int:
        return max(getattr(t, name) for t in per_type.values())

    norm_bwd = top("grad_hidden_bytes") + 16 * T * h - 4 * T - 4 * h
    return {
        "layer_forward_transient_bytes": top("layer_forward_transient_bytes") + 4 * T * h + live_masks,
        "ckpt_layer_forward_transient_bytes": top("ckpt_layer_forward_transient_bytes") + p * T * h,
        "layer_backward_transient_bytes": max(norm_bwd, top("layer_backward_transient_bytes") + p * T * h + 4 * h),
        "ckpt_layer_backward_transient_bytes": max(
            norm_bwd, top("ckpt_layer_backward_transient_bytes") + p * T * h + 4 * h),
    }


def gemma_profile(shape: ModelShape, micro_batch: int, seq_len: int, dtype: str, attn: str, config: dict,
                  base: Callable[..., ActivationProfile], adapters=None) -> ActivationProfile:
    """The ``ActivationProfile`` of a gemma2 / gemma3_text model (see the module docstring); ``base`` is
    ``core.closed_form.closed_form_profile``, called with the shape as gemma and one layer type's config.
    ``adapters``: frozen weights keep the full fine-tune's profile (an upper bound, as for the other families);
    LoRA is refused in one line (its terms are traced only)."""
    _check(shape, attn, config, adapters)
    b, s, p = micro_batch, seq_len, DTYPE_BYTES[dtype]
    T, h, V, d, L = b * s, shape.hidden_size, shape.vocab_size, shape.head_dim, shape.num_layers  # noqa: N806
    attn_cap, final_cap = _SOFTCAP_DEFAULT[shape.family]
    attn_cap = config.get("attn_logit_softcapping", attn_cap) if shape.family == "gemma2" else None
    final_cap = config.get("final_logit_softcapping", final_cap)
    window = config.get("sliding_window", _WINDOW_DEFAULT)
    types = layer_types(shape.family, config, L)
    gemma = replace(shape, family="gemma")
    common = {k: v for k, v in config.items() if k not in ("sliding_window", "use_sliding_window")}
    common["model_type"] = "gemma"
    per_type = {
        t: base(gemma, b, s, dtype, attn, {**common, "sliding_window": window if t == "sliding_attention" else None})
        for t in dict.fromkeys(types)
    }
    extra = _layer_extra(shape, T, p, b * shape.num_heads * s * s, attn == "eager" and attn_cap is not None)
    layers = {t: prof.layer_saved_bytes + extra for t, prof in per_type.items()}
    masked = attn == "sdpa" and bool(window) and s >= window
    if masked and "sliding_attention" in layers and shape.num_kv_heads == 1:  # repeat_kv of one head: a view
        layers["sliding_attention"] -= 2 * p * T * (shape.q_hidden_size - shape.kv_hidden_size)
    first = per_type[types[0]]
    rotary = (len(per_type) - 1) * 2 * p * s * d if shape.family == "gemma3_text" else 0  # the second table
    masks = len(per_type) * p * b * s * s if attn == "eager" else 0
    if masked and "sliding_attention" in per_type:
        masks = s * s  # sdpa_mask's boolean (1, 1, s, s), expanded over the batch
    live_masks = p * b * s * s if attn == "eager" and len(per_type) > 1 else 0
    return replace(
        first,
        **_transients(per_type, T, h, p, live_masks),
        embedding_saved_bytes=first.embedding_saved_bytes + rotary,
        ckpt_embedding_saved_bytes=first.embedding_saved_bytes + rotary + 8 * s + masks,
        layer_saved_bytes=max(layers.values()),
        all_layers_saved_bytes=sum(layers[t] for t in types),
        head_saved_bytes=first.head_saved_bytes + (p * T * V if final_cap is not None else 0),
    )

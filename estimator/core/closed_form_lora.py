"""Closed-form activation terms of LoRA training: what peft's adapters add and what frozen weights stop saving.

``lora_profile`` turns the full fine-tune's closed-form profile (``core.closed_form``) into LoRA's, term by
term, for the model as peft 0.21 trains it: every base weight frozen, and per wrapped Linear of input width
``n`` (tuners/lora/layer.py ``Linear.forward``: ``result + lora_B(lora_A(dropout(x))) * scaling``, adapters in
the run's dtype as DeepSpeed casts them):

* lora_B keeps lora_A's output, ``p*T*r`` (its weight needs a gradient, so ``mm`` saves its input);
* with ``lora_dropout > 0`` the dropped copy of x, ``p*T*n``, and its 1-byte mask, ``T*n`` (CUDA's
  ``native_dropout``); without dropout lora_A keeps x itself, a tensor some other op may keep already.

A frozen Linear keeps no input (torch's generated autograd saves ``mm``'s ``self`` only when the weight's
gradient is wanted: ``should_compute_output``), and a frozen norm weight no normalized value, so for the
llama-like families (llama, mistral, qwen2, gemma: separate q/k/v/o/gate/up/down projections) the norms'
outputs and the MLP product are kept only when a wrapped Linear without dropout reads them, each norm loses
its cast (``weight * hidden``: p*T*h, gemma's fp32 4T*h) and layer 0 of a plain run, whose input needs no
gradient (nothing trains below it), keeps nothing of its input norm (4T*h + 4T, fp32 input and rstd) nor
the dropout masks of q/k/v. The embedding keeps no input ids (8T: they count with the head, as the
caller's input_ids still live at the end of forward) and the head's final norm loses its cast and output (p*T*h) unless
``lm_head`` is in ``modules_to_save``. The other families (gpt2, gpt_neox, opt, phi3: fused or Conv1D
projections, LayerNorm saving its input either way) get the adapters' terms on top of the full fine-tune's
saves, an upper bound. Transients are the full fine-tune's. Checked against the traced profile
(``trace.trained``) in tests/test_lora_activations.py.
"""

from __future__ import annotations

from dataclasses import replace

from zeroest.estimator.core.adapters import Adapters, _is_target, _names
from zeroest.estimator.core.architecture import param_tensors
from zeroest.estimator.core.profile import ActivationProfile
from zeroest.estimator.core.shape import ModelShape

EXACT_FAMILIES = ("llama", "mistral", "qwen2", "gemma")
"""Families whose frozen-weight savings the closed form counts; the others keep the full fine-tune's saves."""


def wrapped_inputs(shape: ModelShape, adapters: Adapters) -> dict[str, int]:
    """Module name within a layer (``self_attn.q_proj``) -> input width, for the Linears LoRA wraps in layer 0
    (peft wraps the same names in every layer)."""
    out = {}
    for tensor in param_tensors(shape):
        marker = ".0."
        if marker not in tensor.name or tensor.linear_shape is None or not _is_target(tensor, adapters):
            continue
        module = tensor.name.rsplit(".", 1)[0].split(marker, 1)[1]
        out[module] = tensor.linear_shape[1]
    return out


def _saved_input(wrapped: dict[str, int], names: tuple[str, ...], dropout: bool) -> bool:
    """A wrapped Linear among ``names`` keeps its input x itself (no dropout copy)."""
    return not dropout and any(m.rsplit(".", 1)[-1] in names for m in wrapped)


def lora_profile(full: ActivationProfile, shape: ModelShape, adapters: Adapters, T: int, p: int,  # noqa: N803
                 ) -> ActivationProfile:
    """LoRA's profile from the full fine-tune's ``full`` (see the module docstring); T = b*s tokens, p the
    dtype's bytes. A freeze without LoRA keeps ``full``: frozen weights only save less (an upper bound)."""
    if not adapters.lora:
        return full
    wrapped = wrapped_inputs(shape, adapters)
    r, dropout = adapters.lora_rank, adapters.lora_dropout > 0
    added = sum(p * T * r + ((p + 1) * T * n if dropout else 0) for n in wrapped.values())
    layer = full.layer_saved_bytes + added
    embedding, ckpt_embedding, head = full.embedding_saved_bytes, full.ckpt_embedding_saved_bytes, 0
    if shape.family in EXACT_FAMILIES:
        h, i = shape.hidden_size, shape.intermediate_size
        attn_reads = _saved_input(wrapped, ("q_proj", "k_proj", "v_proj"), dropout)
        mlp_reads = _saved_input(wrapped, ("gate_proj", "up_proj"), dropout)
        cast = (4 if shape.family == "gemma" else p) * T * h  # gemma keeps the fp32 normalized value
        layer -= (2 - attn_reads - mlp_reads) * p * T * h + 2 * cast  # outputs unread, casts unsaved
        if not _saved_input(wrapped, ("down_proj",), dropout):
            layer -= p * T * i  # the MLP product
        first_norm = 4 * T * h + 4 * T + (4 * h if shape.family == "gemma" else 0)
        ids = 0 if "embed_tokens" in _names(adapters.modules_to_save) else 8 * T
        reads_input = [n for m, n in wrapped.items() if m.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")]
        masks = sum(T * n for n in reads_input) if dropout else 0  # no gradient in, no mask kept
        embedding -= ids + (first_norm + masks if any(m.startswith("self_attn.") for m in wrapped) else 0)
        ckpt_embedding -= ids
        head = ids - cast - p * T * h + (p * T * h if "lm_head" in _names(adapters.modules_to_save) else 0)
    L = full.num_layers  # noqa: N806 (the formulas' symbol)
    return replace(full, layer_saved_bytes=layer, all_layers_saved_bytes=L * layer,
                   embedding_saved_bytes=embedding, ckpt_embedding_saved_bytes=ckpt_embedding,
                   head_saved_bytes=full.head_saved_bytes + head)

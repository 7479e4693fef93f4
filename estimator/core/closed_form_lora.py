"""Closed-form activation terms of LoRA training: what peft's adapters add and what frozen weights stop saving.

``lora_profile`` turns the full fine-tune's closed-form profile (``core.closed_form``) into LoRA's, term by
term, for the model as peft 0.21 trains it: every base weight frozen, and per wrapped Linear of input width
``n`` (tuners/lora/layer.py ``Linear.forward``: ``result + lora_B(lora_A(dropout(x))) * scaling``, adapters in
the run's dtype as DeepSpeed casts them):

* lora_B keeps lora_A's output, ``p*T*r`` (its weight needs a gradient, so ``mm`` saves its input);
* with ``lora_dropout > 0`` the dropped copy of x, ``p*T*n``, and its 1-byte mask, ``T*n`` (CUDA's
  ``native_dropout``); without dropout lora_A keeps x itself.

A frozen Linear keeps no input: torch's generated autograd saves ``mm``/``addmm``'s ``self`` only when
``should_compute_output`` says the weight's gradient is wanted. So each Linear input the full fine-tune counts
(``_READS``: the norms' outputs, the attention output where it is a copy, the MLP's last input) stays only
where another op keeps it (the attention kernel its output, relu its output) or a wrapped Linear without
dropout reads it. A frozen RMSNorm weight keeps no normalized value (``weight * hidden``: p*T*h, gemma's
fp32 4T*h); LayerNorm keeps its input, mean and rstd either way.

Outside the layers, in a plain run (no checkpointing) nothing below layer 0 trains, so its input needs no
gradient: its input norm keeps nothing (RMSNorm 4T*h + 4T, gemma + 4h; LayerNorm p*T*h + 8T, neox's two
norms 8T more), nor the dropout masks of the Linears reading it, nor an embedding dropout mask (T*h), nor
(neox, when its first MLP Linear is not wrapped) the parallel MLP's activation input. The
frozen embeddings keep no input ids (8T; they count with the head, as the caller's input_ids live on) nor
gpt2's position ids (8s) and opt's positions (8T). The head's final norm loses its output (and RMSNorm's
cast) unless ``lm_head`` is in ``modules_to_save``. Under checkpointing transformers' hook makes the
embeddings' output need a gradient: only the input ids (and opt's positions) go. Transients are the full
fine-tune's. Checked against the traced profile (``trace.trained``) in tests/test_lora_activations.py: equal
saved bytes for all-linear and the q/k/v/o/gate/up/down names, but where no q/k/v is wrapped (the traced
layers then count the rotary cos/sin, 2p*s*r_d, once more than the closed form).
"""

from __future__ import annotations

from dataclasses import replace

from zeroest.estimator.core.adapters import Adapters, _is_target, _names
from zeroest.estimator.core.architecture import param_tensors
from zeroest.estimator.core.profile import ActivationProfile
from zeroest.estimator.core.shape import ModelShape

_LLAMA_READS = {"self_attn.q_proj": "norm1", "self_attn.k_proj": "norm1", "self_attn.v_proj": "norm1",
                "self_attn.o_proj": "attn", "mlp.gate_proj": "norm2", "mlp.up_proj": "norm2",
                "mlp.down_proj": "act"}
_READS = {
    "llama": _LLAMA_READS, "mistral": _LLAMA_READS, "qwen2": _LLAMA_READS, "gemma": _LLAMA_READS,
    "phi3": {"self_attn.qkv_proj": "norm1", "self_attn.o_proj": "attn", "mlp.gate_up_proj": "norm2",
             "mlp.down_proj": "act"},
    "gpt2": {"attn.c_attn": "norm1", "attn.c_proj": "attn", "mlp.c_fc": "norm2", "mlp.c_proj": "act"},
    "gpt_neox": {"attention.query_key_value": "norm1", "attention.dense": "attn",
                 "mlp.dense_h_to_4h": "norm2", "mlp.dense_4h_to_h": "act"},
    "opt": {"self_attn.q_proj": "norm1", "self_attn.k_proj": "norm1", "self_attn.v_proj": "norm1",
            "self_attn.out_proj": "attn", "fc1": "norm2", "fc2": "act"},
}
"""Per family: the Linear (module name within a layer) -> the tensor it reads: the first or second norm's
output, the attention output, the MLP's last input (activation, or gated product)."""


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


def _kept_elsewhere(d, read: str) -> bool:
    """The tensor is saved by a non-Linear op too: the attention kernel's output (not where o_proj reads a
    contiguous copy: eager, the math path, phi3's and neox's cuDNN output), relu's output (opt)."""
    if read == "attn":
        return not (d.kernel in ("eager", "math") or (d.family in ("phi3", "gpt_neox") and d.kernel == "cudnn"))
    return read == "act" and d.family == "opt"


def _widths(d) -> dict[str, int]:
    return {"norm1": d.h, "norm2": d.h, "attn": d.qd, "act": d.i}


def lora_profile(full: ActivationProfile, shape: ModelShape, adapters: Adapters, d) -> ActivationProfile:
    """LoRA's profile from the full fine-tune's ``full`` (see the module docstring); ``d`` is the closed form's
    symbols (``core.closed_form._Dims``). A freeze without LoRA keeps ``full``: frozen weights only save less
    (an upper bound)."""
    if not adapters.lora:
        return full
    T, p, h = d.T, d.p, d.h  # noqa: N806 (the formulas' symbols)
    wrapped = wrapped_inputs(shape, adapters)
    reads = _READS.get(d.family, {})
    r, dropout = adapters.lora_rank, adapters.lora_dropout > 0
    layer = full.layer_saved_bytes + sum(p * T * r + ((p + 1) * T * n if dropout else 0) for n in wrapped.values())
    read_by_lora = {reads[m] for m in wrapped if m in reads and not dropout}
    for read, width in _widths(d).items():
        if read in set(reads.values()) and not _kept_elsewhere(d, read) and read not in read_by_lora:
            layer -= p * T * width
    rms = d.norm_kind == "rmsnorm"
    cast = (4 if d.family == "gemma" else p) * T * h if rms else 0
    layer -= 2 * cast
    if rms:
        first_norm = 4 * T * h + 4 * T + (4 * h if d.family == "gemma" else 0)
    else:
        first_norm = p * T * h + 8 * T * (2 if d.parallel else 1)
    first_reads = ("norm1", "norm2") if d.parallel else ("norm1",)  # neox's both norms read the layer input
    masks = sum(T * n for m, n in wrapped.items() if reads.get(m) in first_reads) if dropout else 0
    if d.parallel and "mlp.dense_h_to_4h" not in wrapped:  # layer 0's MLP has no gradient: gelu keeps nothing
        masks += d.act_extra * p * T * d.i
    saved = _names(adapters.modules_to_save)
    ids = 0 if "embed_tokens" in saved else 8 * T
    positions = {"gpt2": 8 * d.s, "opt": 8 * T}.get(d.family, 0)
    embedding = full.embedding_saved_bytes - ids - positions - first_norm - masks - (T * h if d.embd_mask else 0)
    head = ids - cast - (0 if "lm_head" in saved else p * T * d.proj)
    L = full.num_layers  # noqa: N806 (the formulas' symbol)
    return replace(full, layer_saved_bytes=layer, all_layers_saved_bytes=L * layer,
                   embedding_saved_bytes=embedding, ckpt_embedding_saved_bytes=full.ckpt_embedding_saved_bytes - ids - (
                       positions if d.family == "opt" else 0),
                   head_saved_bytes=full.head_saved_bytes + head)

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
fp32 4T*h), nor do qwen3's and qwen3_moe's frozen ``q_norm``/``k_norm`` (p*T*(a*d + kv*d)); LayerNorm keeps its
input, mean and rstd either way. Frozen routed experts (mixtral, qwen3_moe; LoRA on their attention only) keep
neither their gathered input nor down's (``_frozen_experts``), and the frozen router not its input.

Outside the layers, in a plain run (no checkpointing) nothing below layer 0 trains, so its input needs no
gradient: its input norm keeps nothing (RMSNorm 4T*h + 4T, gemma + 4h; LayerNorm p*T*h + 8T, neox's two
norms 8T more), nor the dropout masks of the Linears reading it, nor an embedding dropout mask (T*h), nor
(neox, when its first MLP Linear is not wrapped) the parallel MLP's activation input. The
frozen embeddings keep no input ids (8T; they count with the head, as the caller's input_ids live on) nor
gpt2's position ids (8s) and opt's positions (8T). The head's final norm loses its output (and RMSNorm's
cast) unless ``lm_head`` is in ``modules_to_save``. Under checkpointing transformers' hook makes the
embeddings' output need a gradient: only the input ids (and opt's positions) go. Transients: the final
norm's output lives through lm_head (p*T*h more at the loss), and the layers' are fitted to the traced op order
for the llama-like families (``_transients``), bounded above for the others (``_bound_transients``). Checked
against the traced profile (``trace.tracer`` with adapters) in tests/test_lora_activations.py: equal
saved bytes for all-linear and the q/k/v/o/gate/up/down names, but where no q/k/v is wrapped (the traced
layers then count the rotary cos/sin, 2p*s*r_d, once more than the closed form).
"""

from __future__ import annotations

from dataclasses import replace

from zeroest.estimator.core.adapters import Adapters, _is_target, name_list
from zeroest.estimator.core.architecture import param_tensors
from zeroest.estimator.core.profile import ActivationProfile
from zeroest.estimator.core.shape import ModelShape

_LLAMA_READS = {"self_attn.q_proj": "norm1", "self_attn.k_proj": "norm1", "self_attn.v_proj": "norm1",
                "self_attn.o_proj": "attn", "mlp.gate_proj": "norm2", "mlp.up_proj": "norm2",
                "mlp.down_proj": "act"}
_MOE_READS = {**{m: r for m, r in _LLAMA_READS.items() if m.startswith("self_attn.")}, "mlp.gate": "norm2"}
_READS = {
    "llama": _LLAMA_READS, "mistral": _LLAMA_READS, "qwen2": _LLAMA_READS, "gemma": _LLAMA_READS,
    "qwen3": _LLAMA_READS, "qwen3_moe": _MOE_READS, "mixtral": _MOE_READS,
    "phi3": {"self_attn.qkv_proj": "norm1", "self_attn.o_proj": "attn", "mlp.gate_up_proj": "norm2",
             "mlp.down_proj": "act"},
    "gpt2": {"attn.c_attn": "norm1", "attn.c_proj": "attn", "mlp.c_fc": "norm2", "mlp.c_proj": "act"},
    "gpt_neox": {"attention.query_key_value": "norm1", "attention.dense": "attn",
                 "mlp.dense_h_to_4h": "norm2", "mlp.dense_4h_to_h": "act"},
    "opt": {"self_attn.q_proj": "norm1", "self_attn.k_proj": "norm1", "self_attn.v_proj": "norm1",
            "self_attn.out_proj": "attn", "fc1": "norm2", "fc2": "act"},
}
"""Per family: the Linear (module name within a layer) -> the tensor it reads: the first or second norm's
output, the attention output, the MLP's last input (activation, or gated product). mixtral's and qwen3_moe's
routers and experts are no Linear (``core.adapters.PEFT_MOE_CONVERTED`` refuses LoRA on them): their
attention's, and the router's ``F.linear`` of the second norm's output, frozen."""
_QK_NORMS = ("qwen3", "qwen3_moe")
"""Families whose attention normalises q and k per head (``Qwen3RMSNorm`` ``q_norm``/``k_norm``)."""


_SEPARATE = ("llama", "mistral", "qwen2", "gemma", "qwen3")
"""Families with separate q/k/v/o/gate/up/down projections, whose LoRA transients ``_transients`` counts."""


def _transients(full: ActivationProfile, d, a: int, dropout: bool) -> dict[str, int]:
    """The layers' transients of LoRA on all 7 projections of a llama-like layer, fitted to the traced op order
    (``trace.tracer`` with adapters, llama-3-8b, mistral-7b, qwen2.5-0.5b, gemma-2b, tinyllama-1.1b; exact but for a few
    bytes a token, except gemma's fp32-adapter forward, 6T*h under): each wrapped Linear holds its base output,
    lora_B's scaled output and their sum at once (the widest, gate/up, p*T*i beyond the full fine-tune's),
    the fp32 casts and sums of fp32 adapters ``a = 4``, and the dropout copies' gradients in backward. Never
    below the full fine-tune's."""
    T, p, h, i = d.T, d.p, d.h, d.i  # noqa: N806 (the formulas' symbols)
    if a == p:
        fwd = p * i + (7 * p * h + 16 if dropout else 3 * p * h)
        ckpt_fwd, bwd = p * i + 8, 0
        ckpt_bwd = 4 * p * h - p * i + 8 if dropout else 0
    else:  # 16-bit run, fp32 adapters
        fwd = (6 * i if dropout else 2 * i) + 18 * h + 16
        ckpt_fwd, bwd = 6 * i + 4 * h + 8, 2 * h + 8
        ckpt_bwd = 12 * h + 2 * i + 8 if dropout else 10 * h
    return {
        "layer_forward_transient_bytes": max(full.layer_forward_transient_bytes, T * fwd),
        "ckpt_layer_forward_transient_bytes": full.ckpt_layer_forward_transient_bytes + T * ckpt_fwd,
        "layer_backward_transient_bytes": full.layer_backward_transient_bytes + T * bwd,
        "ckpt_layer_backward_transient_bytes": full.ckpt_layer_backward_transient_bytes + max(0, T * ckpt_bwd),
    }


def _bound_transients(full: ActivationProfile, shape: ModelShape, adapters: Adapters, T: int, p: int,  # noqa: N803
                      a: int) -> dict[str, int]:
    """An upper bound of the LoRA transients of the other families (gpt2, gpt_neox, opt, phi3), over the traced
    ones on their presets: at the widest wrapped Linear (output width o), lora_B's scaled output and the sum
    beside the base output, (a + max(a, p)) * T*o, and with fp32 adapters the fp32 cast of the widest input n,
    4T*n, added to every layer transient."""
    outs = [t.linear_shape for t in param_tensors(shape)
            if t.linear_shape is not None and ".0." in t.name and _is_target(t, adapters)]
    extra = (a + max(a, p)) * T * max(o for o, _ in outs) + (4 * T * max(n for _, n in outs) if a != p else 0)
    names = ("layer_forward_transient_bytes", "ckpt_layer_forward_transient_bytes",
             "layer_backward_transient_bytes", "ckpt_layer_backward_transient_bytes")
    return {name: getattr(full, name) + extra for name in names}


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


def _frozen_experts(shape: ModelShape, d) -> int:
    """What frozen routed experts stop saving (``core.closed_form_moe._moe_saved``'s terms): ``grouped_mm`` with
    a frozen weight keeps neither the gathered states (gate/up's input, p*T*k*h) nor the product (down's input,
    p*T*k*i_e). A model with dense layers too (whose frozen down keeps no p*T*i) loses the smaller of the two,
    as its closed form takes the larger layer for every layer."""
    sparse = shape.extra.get("sparse_layers") if shape.family in ("mixtral", "qwen3_moe") else None
    if not sparse:
        return 0
    x = shape.extra
    experts = d.p * d.T * x["top_k"] * (d.h + x["expert_size"])
    return experts if len(sparse) == shape.num_layers else min(experts, d.p * d.T * d.i)


def _kept_elsewhere(d, read: str) -> bool:
    """The tensor is saved by a non-Linear op too: the attention kernel's output (not where o_proj reads a
    contiguous copy: eager, the math path, phi3's and neox's cuDNN output), relu's output (opt)."""
    if read == "attn":
        return not (d.kernel in ("eager", "math") or (d.family in ("phi3", "gpt_neox") and d.kernel == "cudnn"))
    return read == "act" and d.family == "opt"


def _widths(d) -> dict[str, int]:
    return {"norm1": d.h, "norm2": d.h, "attn": d.qd, "act": d.i}


def lora_profile(full: ActivationProfile, shape: ModelShape, adapters: Adapters, d,
                 adapters_fp32: bool = False, zero3_linear: bool = False) -> ActivationProfile:
    """LoRA's profile from the full fine-tune's ``full`` (see the module docstring); ``d`` is the closed form's
    symbols (``core.closed_form._Dims``). A freeze without LoRA keeps ``full``: frozen weights only save less
    (an upper bound). ``adapters_fp32``: peft's fp32 adapters (a model built under zero.Init): each wrapped
    Linear saves its own fp32 cast of x, 4T*n (or the cast's dropped copy, 4T*n, and mask), and lora_B an
    fp32 4T*r. ``zero3_linear``: stage 3's ``torch.nn.functional.linear`` (runtime/zero/linear.py
    ``LinearFunctionForZeroStage3`` saves every call's input, ``trace.zero3_linear``): the frozen base Linears
    keep what the full fine-tune's Linears keep, inside the layers and at lm_head."""
    if not adapters.lora:
        return full
    T, p, h = d.T, d.p, d.h  # noqa: N806 (the formulas' symbols)
    wrapped = wrapped_inputs(shape, adapters)
    reads = _READS.get(d.family, {})
    r, dropout = adapters.lora_rank, adapters.lora_dropout > 0
    a = 4 if adapters_fp32 else p  # the adapters' element bytes
    copies = a + 1 if dropout else (a if a != p else 0)  # per input element: lora_A's own input and mask
    layer = full.layer_saved_bytes + sum(a * T * r + copies * T * n for n in wrapped.values())
    read_by_lora = {reads[m] for m in wrapped if m in reads and not dropout and a == p}
    for read, width in _widths(d).items():
        if (read in set(reads.values()) and not _kept_elsewhere(d, read) and read not in read_by_lora
                and not zero3_linear):
            layer -= p * T * width
    rms = d.norm_kind == "rmsnorm"
    cast = (4 if d.family == "gemma" else p) * T * h if rms else 0
    layer -= 2 * cast
    if d.family in _QK_NORMS:  # frozen q_norm/k_norm weights keep no cast either: p*T*(a*d + kv*d)
        layer -= p * T * (shape.q_hidden_size + shape.kv_hidden_size)
    layer -= _frozen_experts(shape, d)
    if rms:
        first_norm = 4 * T * h + 4 * T + (4 * h if d.family == "gemma" else 0)
    else:
        first_norm = p * T * h + 8 * T * (2 if d.parallel else 1)
    first_reads = ("norm1", "norm2") if d.parallel else ("norm1",)  # neox's both norms read the layer input
    masks = sum(T * n for m, n in wrapped.items() if reads.get(m) in first_reads) if dropout else 0
    if d.parallel and "mlp.dense_h_to_4h" not in wrapped:  # layer 0's MLP has no gradient: gelu keeps nothing
        masks += d.act_extra * p * T * d.i
    saved = name_list(adapters.modules_to_save)
    ids = 0 if "embed_tokens" in saved else 8 * T
    positions = {"gpt2": 8 * d.s, "opt": 8 * T}.get(d.family, 0)
    embedding = full.embedding_saved_bytes - ids - positions - first_norm - masks - (T * h if d.embd_mask else 0)
    lm_head_input = "lm_head" in saved or zero3_linear  # a trained lm_head, or stage 3's linear, keeps it
    head = ids - cast - (0 if lm_head_input else p * T * d.proj)
    L = full.num_layers  # noqa: N806 (the formulas' symbol)
    transients = _transients(full, d, a, dropout) if d.family in _SEPARATE else _bound_transients(
        full, shape, adapters, T, p, a)
    # the final norm's output is a transient when no trained lm_head (or stage 3's linear) keeps it
    return replace(full, **transients, layer_saved_bytes=layer, all_layers_saved_bytes=L * layer,
                   loss_transient_bytes=full.loss_transient_bytes + (0 if lm_head_input else p * T * d.proj),
                   grad_hidden_bytes=full.grad_hidden_bytes + ids,
                   embedding_saved_bytes=embedding, ckpt_embedding_saved_bytes=full.ckpt_embedding_saved_bytes - ids - (
                       positions if d.family == "opt" else 0),
                   head_saved_bytes=full.head_saved_bytes + head)

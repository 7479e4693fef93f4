"""The closed-form activation profile: Table 2 of arXiv 2205.05198 adapted, term by term, to what HF saves.

``closed_form_profile`` fills the ``ActivationProfile`` (``core.profile``) from the model's shape and HF config
without torch: one helper per block (norms, attention, MLP, embeddings, head) and per transient, each naming
the tensors it counts. Every family's switches (activation, dropout, rotary fraction, sliding window, fused
projections) are read once into ``_Dims``; the traced profile (``trace.tracer``) is the reference it was
checked against, storage by storage.
"""

from __future__ import annotations

from dataclasses import dataclass

from zeroest.estimator.core.adapters import Adapters
from zeroest.estimator.core.arch_qwen3_mixtral import MOE_FAMILIES
from zeroest.estimator.core.closed_form_gemma import GEMMA_FAMILIES, gemma_profile
from zeroest.estimator.core.hf_config import hf_config
from zeroest.estimator.core.profile import DTYPE_BYTES, ActivationProfile, check_kind
from zeroest.estimator.core.shape import ModelShape

# -- closed form
# ------------------------------------------------------------------------------------------------------
# Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models" (arXiv 2205.05198),
# Table 2 and eq. 1: one GPT layer with 16-bit activations and 1-byte dropout masks saves s*b*h*(34 + 5*a*s/h)
# bytes:
#   attention 11sbh + 5as^2b = QKV input 2sbh, Q and K 4sbh, softmax output 2as^2b, its dropout mask
#   as^2b, the dropped probabilities 2as^2b, V 2sbh, output-projection input 2sbh, output dropout mask sbh;
#   MLP 19sbh = input 2sbh, GeLU input 8sbh, GeLU output 8sbh, dropout mask sbh;
#   LayerNorms 4sbh (their inputs).
# Below, every term is that table's, adapted to what HF transformers 5.24 saves (checked storage by storage
# against the traced profile, estimator/trace/): dtype bytes p instead of 2, GQA widths, fused kernels,
# fp32 norms.

_LLAMA_LIKE = ("llama", "mistral", "qwen2", "phi3", "gemma")
_LLAMA_LIKE += MOE_FAMILIES  # qwen3, qwen3_moe, mixtral: llama's layer, and core.closed_form_moe's terms
_ACT_EXTRA = {"gelu_new": 4, "gelu_fast": 4, "gelu_python_tanh": 4, "gelu_accurate": 4, "relu": 0}
"""Tensors of b*s*i an MLP activation saves besides its output: F.silu/F.gelu save their input (1, the
default); relu saves only its output (0); HF's Python tanh-GELUs (``NewGELUActivation``:
``0.5*x*(1+tanh(c*(x+0.044715x^3)))``) save x, 0.5x, tanh and 1+tanh (4)."""
_DEFAULT_ACT = {"gpt2": "gelu_new", "opt": "relu", "gpt_neox": "gelu", "gemma": "gelu_pytorch_tanh"}
"""The MLP activation when the config names none (the config classes' defaults; the others' is silu)."""
_RESID_DROPOUT = {"gpt2": ("resid_pdrop", 0.1), "opt": ("dropout", 0.1), "phi3": ("resid_pdrop", 0.0),
                  "gpt_neox": ("hidden_dropout", 0.0)}
"""(config key, class default) of the dropout after attention and MLP; the other families have none."""
_EMBD_DROPOUT = {"gpt2": ("embd_pdrop", 0.1), "phi3": ("embd_pdrop", 0.0), "gpt_neox": ("hidden_dropout", 0.0)}
"""(config key, class default) of the dropout after the embeddings; the other families have none."""
_ATTN_DROPOUT = {"gpt2": ("attn_pdrop", 0.1)}
"""(config key, class default) of the dropout on the attention probabilities; the others': attention_dropout,
0.0."""


def _dropout(config: dict, table: dict, family: str, default: tuple[str, float] | None = None) -> float:
    """The family's dropout probability from ``table`` ((key, default) per family), 0.0 where it has none."""
    key, value = table.get(family, default or ("", 0.0))
    return config.get(key, value) if key else 0.0


@dataclass(frozen=True)
class _Dims:
    """The symbols of the formulas: T = b*s tokens and the model's widths, with HF's family switches."""

    b: int
    s: int
    h: int
    a: int
    qd: int
    kd: int
    i: int
    V: int
    p: int
    family: str
    gated: bool
    act_extra: int
    rotary_dim: int
    resid_masks: int
    embd_mask: bool
    attn_dropout: bool
    parallel: bool
    masked: bool
    proj: int
    kernel: str
    """eager, or the kernel CUDA takes for sdpa: cudnn (fp16/bf16 with head_dim <= 256, and flash-attn: the
    same bytes), efficient (fp32 multi-head), math (fp32 GQA: probabilities materialized as in eager)."""

    @property
    def norm_kind(self) -> str:
        """rmsnorm (llama-like), or layernorm (gpt2, gpt_neox, opt)."""
        return "rmsnorm" if self.family in _LLAMA_LIKE else "layernorm"

    @property
    def T(self) -> int:  # noqa: N802 (the formulas' symbol)
        return self.b * self.s


def _dims(shape: ModelShape, b: int, s: int, dtype: str, attn: str, config: dict) -> _Dims:
    """The formulas' symbols from the shape and the HF config (defaults: transformers 5.24 config classes)."""
    f, get = shape.family, config.get
    act = get("hidden_activation") or get("hidden_act") or get("activation_function") or \
        _DEFAULT_ACT.get(f, "silu")
    resid = _dropout(config, _RESID_DROPOUT, f)
    embd = _dropout(config, _EMBD_DROPOUT, f)
    attn_drop = _dropout(config, _ATTN_DROPOUT, f, ("attention_dropout", 0.0))
    pct = get("rotary_pct", get("partial_rotary_factor", 0.25)) if f == "gpt_neox" else \
        get("partial_rotary_factor", 1.0)
    window = get("sliding_window") if get("use_sliding_window", True) else None
    masked = attn == "sdpa" and bool(window) and s >= window
    p = DTYPE_BYTES[dtype]
    if attn == "eager":
        kernel = "eager"
    elif attn == "flash" or (p < 4 and shape.head_dim <= 256):
        kernel = "cudnn"
    else:  # with a mask HF has already repeated k and v (sdpa_attention.py, ``use_gqa_in_sdpa``)
        kernel = "efficient" if (shape.num_kv_heads == shape.num_heads or masked) else "math"
    return _Dims(
        b=b, s=s, h=shape.hidden_size, a=shape.num_heads, qd=shape.q_hidden_size, kd=shape.kv_hidden_size,
        i=shape.intermediate_size, V=shape.vocab_size, p=p, family=f, gated=shape.gated_mlp,
        act_extra=_ACT_EXTRA.get(act, 1),
        rotary_dim=int(shape.head_dim * pct) if shape.positions == "rotary" else 0,
        resid_masks=2 if resid > 0 else 0, embd_mask=embd > 0, attn_dropout=attn_drop > 0,
        parallel=f == "gpt_neox" and get("use_parallel_residual", True), masked=masked, kernel=kernel,
        proj=int(get("word_embed_proj_dim", shape.hidden_size)) if f == "opt" else shape.hidden_size,
    )


def _norm_saved(d: _Dims, with_input: bool = True) -> int:
    """One norm's saved bytes with its output (the next projection's input: Table 2's "QKV/MLP input 2sbh").

    Table 2 keeps LayerNorm's input (2sbh). HF's RMSNorm (modeling_llama.py ``LlamaRMSNorm``) upcasts: it
    saves the fp32 input 4sbh, the fp32 rstd 4sb and the normalized value cast back, p*sbh; gemma's
    (``GemmaRMSNorm``) keeps the normalized value in fp32 (4sbh) and the fp32 ``1 + weight`` (4h). LayerNorm
    (``native_layer_norm``) saves its input p*sbh and fp32 mean and rstd, 8sb (CUDA's accumulate type); a
    parallel-residual gpt_neox layer feeds both norms the same input, saved once (``with_input=False`` for the
    second).
    """
    T, h, p = d.T, d.h, d.p
    if d.family == "gemma":
        return 8 * T * h + 4 * T + 4 * h + p * T * h
    if d.family in _LLAMA_LIKE:
        return 4 * T * h + 4 * T + p * T * h + p * T * h
    return (p * T * h if with_input else 0) + 8 * T + p * T * h


def _attention_saved(d: _Dims, attn: str) -> int:
    """The attention block's saved bytes without its input norm (Table 2's 11sbh + 5as^2b, adapted).

    Q and K (4sbh): saved after rotary, q of width a*d and k of the kv width (GQA); gpt2 and neox keep their
    fused qkv output (v is a view of it, 6sbh at once), phi3 its fused qkv_proj output (v is a view). V 2sbh:
    the v projection (kv width). Output-projection input 2sbh: the attention output, shared with the kernel's
    saved output; a second copy when cuDNN's output follows a (b, a, s, d)-contiguous q, as after phi3's and
    neox's ``torch.cat`` rotary, and always for eager's ``transpose(1, 2).contiguous()``. A sliding-window
    mask (sdpa, s >= window) makes HF repeat k and v to all heads and torch save the mask as an additive
    p*bs^2 bias per layer. The 5as^2b softmax terms: none for the fused kernels (cuDNN saves fp32 stats 4bas
    and two int64 RNG scalars; the memory-efficient kernel its logsumexp padded to 32 positions); for eager
    and the math path the fp32 softmax output 4as^2b and its cast to p (llama-like:
    ``softmax(dtype=float32).to(dtype)``; gpt2's softmax runs in p), with attention dropout its 1-byte mask
    and the dropped probabilities. Output dropout mask sbh (1 byte) when residual dropout is on (gpt2
    ``resid_pdrop``, opt ``dropout``, phi3 ``resid_pdrop``, neox ``hidden_dropout``).
    """
    T, h, p, qd, kd, bas2 = d.T, d.h, d.p, d.qd, d.kd, d.b * d.a * d.s * d.s
    masks = T * h if d.resid_masks else 0
    if d.kernel in ("eager", "math"):
        if d.family == "gpt2":
            probs = p * bas2 + (bas2 + p * bas2 if d.attn_dropout else 0)
        else:
            probs = (
                4 * bas2 + (p * bas2 if (p < 4 or d.attn_dropout) else 0) + (bas2 if d.attn_dropout else 0)
            )
        return 4 * p * T * qd + probs + masks
    lse = 4 * d.b * d.a * (d.s if d.kernel == "cudnn" else -(-d.s // 32) * 32) + 16
    bias = p * d.b * d.s * d.s if d.masked else 0
    if d.family in ("gpt2", "opt"):
        qkv = 3 * p * T * h
    elif d.family == "gpt_neox":
        qkv = 3 * p * T * h + 2 * p * T * h
    elif d.masked and qd != kd:  # with a mask HF repeats k and v to all heads (sdpa_attention.py, repeat_kv)
        qkv = 3 * p * T * qd
    elif d.family == "phi3":
        qkv = p * T * (qd + 2 * kd) + p * T * (qd + kd)
    else:
        qkv = p * T * (qd + 2 * kd)
    copy = p * T * qd if d.family in ("phi3", "gpt_neox") and d.kernel == "cudnn" else 0
    return qkv + p * T * qd + copy + lse + bias + masks


def _mlp_saved(d: _Dims) -> int:
    """The MLP's saved bytes without its input norm (Table 2's 19sbh, adapted).

    GeLU input 8sbh and output 8sbh become p*s*b*i each; a gated MLP (SwiGLU/GeGLU) also saves the up
    projection and the product (4 tensors of p*s*b*i); the activation saves ``_ACT_EXTRA`` tensors besides its
    output (relu none, F.gelu/F.silu their input, gpt2's Python GELU four). Dropout mask sbh when residual
    dropout is on.
    """
    per = (d.act_extra + 3) if d.gated else (d.act_extra + 1)
    return per * d.p * d.T * d.i + (d.T * d.h if d.resid_masks else 0)


def _layer_saved(d: _Dims, attn: str) -> int:
    """One decoder layer without checkpointing: two norms, attention, MLP (Table 2's sbh(34 + 5as/h))."""
    return (
        _norm_saved(d) + _norm_saved(d, with_input=not d.parallel) + _attention_saved(d, attn) + _mlp_saved(d)
    )


def _embedding_saved(d: _Dims, attn: str, grad_ckpt: bool) -> int:
    """Outside the layers: int64 input ids 8bs (kept by the embedding's backward), rotary cos and sin
    (1, s, r) in p shared by every layer, gpt2's position ids 8s, opt's positions 8bs, an embedding dropout
    mask bsh.

    Under checkpointing the layers' tensor arguments are kept too: llama-like and neox position ids (8s),
    opt's (8bs) and, for eager or a sliding-window mask, the mask (b, 1, s, s) (p bytes for eager, 1 for
    sdpa's bool).
    """
    T, s = d.T, d.s
    out = 8 * T + 2 * d.p * s * d.rotary_dim + (T * d.h if d.embd_mask else 0)
    out += {"gpt2": 8 * s, "opt": 8 * T}.get(d.family, 0)
    if grad_ckpt:
        out += {"gpt2": 0, "opt": 8 * T}.get(d.family, 8 * s)
        if attn == "eager":
            out += d.p * d.b * s * s
        elif d.masked:
            out += d.b * s * s
    return out


def _head_saved(d: _Dims) -> int:
    """Final norm (with its output, lm_head's input), opt's ``project_out`` output, the shifted int64 labels
    8bs, the fp32 log-softmax output 4bsV (``ForCausalLMLoss`` upcasts the logits; cross_entropy's log_softmax
    saves its output), nll_loss's fp32 total weight and the loss value (4 + 4)."""
    T = d.T
    norm = _norm_saved(d)
    proj = d.p * T * d.proj if d.proj != d.h else 0
    return norm + proj + 8 * T + 4 * T * d.V + 8


def _mlp_forward_peak(d: _Dims) -> int:
    """Live MLP intermediates at the peak of a layer's forward when nothing is saved (checkpointing): a gated
    MLP holds act, up and their product (phi3 also its fused gate_up output), a two-matrix one its input and
    output, gpt2's Python GELU five tensors of b*s*i; plus the norm's output and the residual, 2p*bsh."""
    T, p, i = d.T, d.p, d.i
    if d.gated:
        n = 4 if d.family == "phi3" else 3
    else:
        n = 5 if d.act_extra == 4 else 2
    return n * p * T * i + 2 * p * T * d.h


def _mlp_backward_peak(d: _Dims) -> int:
    """Extra over the saved stack at the MLP's backward peak: the gradients of the activation's input and
    output (and of the up projection, minus the freed product, for gated MLPs), p*bsi each; less a freed
    dropout mask."""
    n = 1 if (not d.gated and d.act_extra == 1) else 2
    return n * d.p * d.T * d.i - (d.T * d.h if d.resid_masks else 0)


def _eager_transients(d: _Dims) -> tuple[int, int, int]:
    """Eager attention's extra live bytes over the saved stack: plain forward, checkpointed forward, backward.

    Fitted to the traced op order (estimator/trace/). Forward: the raw and masked scores (p*bas^2 each)
    and the (b, 1, s, s) mask; checkpointed, the fp32 softmax and its cast too, with q, k, v and the output.
    Backward: the gradients of the probabilities in p and fp32 ((p + 4)*bas^2; gpt2's dtype softmax: p*bas^2),
    once the layer's MLP and second norm have freed their saved tensors.
    """
    T, p, qd, bas2, bs2 = d.T, d.p, d.qd, d.b * d.a * d.s * d.s, d.b * d.s * d.s
    freed = _mlp_saved(d) + _norm_saved(d, with_input=not d.parallel)
    if d.family == "gpt2":
        probs = (2 * p + 1) if d.attn_dropout else p
        return 0, probs * bas2 + 4 * p * T * qd, p * bas2 - freed
    fwd = 4 * bas2 + p * bs2 + 3 * p * T * d.h - freed
    ckpt = (4 + p + (2 * p if p < 4 else 0)) * bas2 + 4 * p * T * qd
    return fwd, ckpt, (p + 4) * bas2 - freed - p * T * qd


def closed_form_profile(shape: ModelShape, micro_batch: int, seq_len: int, dtype: str = "bf16",
                        attn: str = "sdpa", config: dict | None = None,
                        adapters: Adapters | None = None, adapters_fp32: bool = False,
                        zero3_linear: bool = False) -> ActivationProfile:
    """The ``ActivationProfile`` from formulas (Table 2 of arXiv 2205.05198 adapted to HF; see the helpers).

    ``config`` is the HF config.json dict when known (activation, dropout, rotary fraction, sliding window);
    otherwise ``core.hf_config.hf_config(shape)`` rebuilds it. Covers both checkpointing modes. The head's
    terms follow transformers' loss/loss_utils.py ``ForCausalLMLoss`` (``logits.float()``, labels padded to s + 1
    and shifted, ``cross_entropy`` = ``log_softmax`` + ``nll_loss``): the loss peak holds the fp32 upcast 4bsV
    and the padded labels 8b(s + 1); the head's backward peak holds nll_loss's fp32 gradient and
    ``log_softmax_backward``'s output (8bsV) before their cast to p, the labels (8bs) freed. Transients of the
    layers are the traced op order's (estimator/trace/) in named tensors: grad_hidden p*bsh carried between
    layers, RMSNorm's fp32 temporaries, the MLP's and eager attention's live intermediates. ``adapters`` with
    LoRA on: ``core.closed_form_lora.lora_profile`` of that profile (``adapters_fp32``: peft's fp32 adapters;
    ``zero3_linear``: stage 3's linear keeps the frozen Linears' inputs).
    """
    check_kind(dtype, attn)
    config = config if config is not None else hf_config(shape)
    if shape.family in MOE_FAMILIES:
        from zeroest.estimator.core import closed_form_moe as moe

        config = moe.window_config(shape, config)
    if shape.family in GEMMA_FAMILIES:  # gemma2, gemma3_text: core.closed_form_gemma (no LoRA terms there)
        return gemma_profile(shape, micro_batch, seq_len, dtype, attn, config, closed_form_profile, adapters)
    d = _dims(shape, micro_batch, seq_len, dtype, attn, config)
    T, h, p, V, L = d.T, d.h, d.p, d.V, shape.num_layers
    layer = _layer_saved(d, attn)
    ckpt_layer = p * T * h
    grad_hidden = p * T * h + 8
    norm_temp = (8 + p) * T * h + 4 * T if d.norm_kind != "layernorm" else 2 * p * T * h
    quadratic = d.kernel in ("eager", "math")
    eager_fwd, eager_ckpt_fwd, eager_bwd = _eager_transients(d) if quadratic else (0, 0, 0)
    layer_bwd = grad_hidden + max(_mlp_backward_peak(d), eager_bwd)
    profile = ActivationProfile(
        embedding_saved_bytes=_embedding_saved(d, attn, False),
        ckpt_embedding_saved_bytes=_embedding_saved(d, attn, True),
        layer_saved_bytes=layer,
        ckpt_layer_saved_bytes=ckpt_layer,
        all_layers_saved_bytes=L * layer,
        ckpt_all_layers_saved_bytes=L * ckpt_layer,
        head_saved_bytes=_head_saved(d),
        logits_bytes=p * T * V,
        loss_transient_bytes=(4 * T * V if p < 4 else 0) + 8 * d.b * (d.s + 1),
        layer_forward_transient_bytes=max(norm_temp + p * T * h, eager_fwd),
        ckpt_layer_forward_transient_bytes=max(_mlp_forward_peak(d), eager_ckpt_fwd),
        grad_logits_bytes=p * T * V,
        backward_head_transient_bytes=(8 - p) * T * V - 8 * T,
        grad_hidden_bytes=grad_hidden,
        layer_backward_transient_bytes=layer_bwd,
        ckpt_layer_backward_transient_bytes=layer_bwd - (p * T * h if d.norm_kind == "layernorm" else 0),
    )
    if shape.family in MOE_FAMILIES:
        parts = moe.Dense(mlp_saved=_mlp_saved(d), fwd=norm_temp + p * T * h, ckpt_fwd=_mlp_forward_peak(d),
                          bwd=grad_hidden + _mlp_backward_peak(d), eager=_eager_transients(d) if quadratic else None,
                          mask=p * d.b * d.s * d.s if attn == "eager" else d.s * d.s * int(d.masked))
        profile = moe.moe_profile(profile, parts, shape, config, micro_batch, seq_len, p)
    if adapters is None or adapters.full:
        return profile
    from zeroest.estimator.core.closed_form_lora import lora_profile  # LoRA only: kept off predict's start-up

    return lora_profile(profile, shape, adapters, d, adapters_fp32, zero3_linear)

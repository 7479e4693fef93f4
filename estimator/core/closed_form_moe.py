"""Closed-form activations of qwen3 (q/k norms), and of mixtral's and qwen3_moe's routed experts.

``core.closed_form`` builds the llama-like profile of these families (their attention, norms, embeddings and head
are llama's) and hands it here with its dense candidates (``Dense``); ``moe_profile`` adds qwen3's q/k norms and
puts the sparse block in place of the dense MLP, term by term as transformers 5.24 runs it (checked storage by
storage against the traced profile, estimator/trace/).

Routing: the experts run transformers' default ``experts_implementation``, ``grouped_mm``
(integrations/moe.py ``grouped_mm_experts_forward``: every token's k (token, expert) rows are gathered, sorted by
expert and multiplied by one grouped matmul, ``F.grouped_mm`` or ``torch._grouped_mm``, over all E experts at
once, rows past each expert's offset skipped). Every tensor then has T*k rows whatever the router picks, so the
bytes below hold for any routing, the tracer's meta-device run (no real routing at all) included. The eager
per-expert loop (``experts_implementation="eager"``) is not modelled.

Symbols: T = b*s tokens, h width, E experts, k experts per token, i_e an expert's width, p the run's dtype
bytes, w the routing weights' bytes (mixtral keeps the fp32 softmax values, ``MixtralTopKRouter``; qwen3_moe
casts them to p, ``Qwen3MoeTopKRouter``), q the weighted expert output's bytes (p times w promotes to fp32 in
mixtral: q = 4; q = p in qwen3_moe).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from zeroest.estimator.core.profile import ActivationProfile
from zeroest.estimator.core.shape import ModelShape


@dataclass(frozen=True)
class Dense:
    """The llama-like layer's candidates that ``core.closed_form`` computed, in bytes: its dense MLP's saved
    bytes, and the candidates of each transient's max (the norm's or the MLP's, and eager attention's)."""

    mlp_saved: int
    fwd: int
    ckpt_fwd: int
    bwd: int
    eager: tuple[int, int, int] | None
    """Eager (or math-kernel) attention's forward, checkpointed-forward and backward transients, or None."""
    mask: int
    """The attention mask that lives through a layer's forward (masking_utils): eager's additive p*b*s^2; a
    sliding window's bool s^2 under sdpa (one (s, s) storage expanded over the batch); else 0."""


@dataclass(frozen=True)
class _Moe:
    T: int
    s: int
    h: int
    p: int
    E: int
    k: int
    ie: int
    w: int
    q: int
    norm_topk: bool


def window_config(shape: ModelShape, config: dict) -> dict:
    """The config as ``closed_form._dims`` reads its sliding window: qwen3 and qwen3_moe default
    ``use_sliding_window`` to False (configuration_qwen3.py ``__post_init__`` then drops ``sliding_window``);
    qwen3 slides only in layers from ``max_window_layers`` (28) on, taken as all layers when any does (the
    larger case)."""
    if shape.family == "mixtral":
        return config
    slides = bool(config.get("use_sliding_window", False))
    if shape.family == "qwen3":
        slides = slides and config.get("max_window_layers", 28) < shape.num_layers
    return {**config, "use_sliding_window": slides}


def qk_norm_saved(shape: ModelShape, T: int, p: int) -> int:
    """qwen3's ``q_norm`` and ``k_norm`` (``Qwen3RMSNorm`` over head_dim, per head, before rotary): each saves
    its fp32 input 4*T*width, fp32 rstd 4*T*heads and the input-dtype cast p*T*width that the weight multiplies:
    (4 + p) * T * (a*d + kv*d) + 4 * T * (a + kv)."""
    width = shape.q_hidden_size + shape.kv_hidden_size
    return (4 + p) * T * width + 4 * T * (shape.num_heads + shape.num_kv_heads)


def _moe_saved(m: _Moe) -> int:
    """One sparse block's saved bytes (its input norm's output is the norm's).

    Router (``*TopKRouter.forward``): ``softmax(logits.float())`` saves its fp32 output 4TE; ``topk`` its int64
    indices 8Tk; mixtral's (and qwen3_moe's with ``norm_topk_prob``) in-place renormalisation
    ``/= sum`` saves the sum 4T and a copy of the values 4Tk. Experts (``grouped_mm_experts_forward``): the
    sort permutation and its ``// k`` (int64 8Tk each, the gathers' indices), the gathered hidden states p*Tk*h
    and weights w*Tk, the int32 offsets 4E, the fused gate/up output 2p*Tk*i_e (kept by the activation and, as
    ``up``, by the product), the activation's output and the product p*Tk*i_e each, the down projection's
    output p*Tk*h (the weights' multiplication keeps it) and the inverse permutation 8Tk:
    4TE + 32Tk + w*Tk + 4E + p*Tk*(2h + 4 i_e) (+ 4T + 4Tk renormalised).
    """
    T, k = m.T, m.k
    norm = 4 * T + 4 * T * k if m.norm_topk else 0
    return 4 * T * m.E + 32 * T * k + m.w * T * k + 4 * m.E + m.p * T * k * (2 * m.h + 4 * m.ie) + norm


def _moe_forward(m: _Moe) -> int:
    """Live over the stack at the sparse block's forward peak, no checkpointing: the embedding output, the
    layer input and the residual (3p*Th), int64 position ids 8s, the router logits p*TE, the routing weights w*Tk,
    the sorted expert ids 8Tk, the ids ``histc`` counts (int32 4Tk) and its counts 4E, and then either the
    weighted output and its gather back to token order (2q*Tkh) or the gather, its sum over k (q*Th) and the
    cast back to p (mixtral)."""
    T, k, h, p, q = m.T, m.k, m.h, m.p, m.q
    base = 3 * p * T * h + 8 * m.s + p * T * m.E + m.w * T * k + 12 * T * k + 4 * m.E
    return base + max(2 * q * T * k * h, q * T * k * h + q * T * h + (p * T * h if q != p else 0))


def _moe_ckpt_forward(m: _Moe) -> int:
    """The same under checkpointing (nothing saved): the residual and the norm's output 2p*Th, the router's
    logits p*TE, weights w*Tk and indices 8Tk, the sorted ids and the permutation 16Tk, the gathered states p*Tkh
    and weights w*Tk, histc's int32 input 4Tk, counts and offsets 8E; then either the fused gate/up output, the
    activation and the product (4p*Tk*i_e), or the down output p*Tkh and the inverse permutation 8Tk with the
    weighted output and its gather (2q*Tkh) or the gather, its sum and mixtral's cast, as in ``_moe_forward``."""
    T, k, h, p, q = m.T, m.k, m.h, m.p, m.q
    base = 2 * p * T * h + p * T * m.E + 2 * m.w * T * k + 28 * T * k + p * T * k * h + 8 * m.E
    weighted = max(2 * q * T * k * h, q * T * k * h + q * T * h + (p * T * h if q != p else 0))
    return base + max(4 * p * T * k * m.ie, p * T * k * h + 8 * T * k + weighted)


def _moe_backward(m: _Moe, grad_hidden: int, ckpt: bool) -> int:
    """Extra over the stack at the sparse block's backward peak: the incoming gradient, and the gradients of the
    weighted output's sum (its expansion, the zeros it is scattered into and the scatter: 3q*Tkh). Without
    checkpointing mixtral's fp32 gradient of the experts' output is cast back to p (p*Tkh) once the inverse
    permutation (8Tk) has been freed. Under checkpointing the recompute (which stops at the inverse permutation)
    runs while the expansion q*Tkh lives: the weighted output q*Tkh, the residual p*Th, the router's logits, the
    weights, the sorted ids, histc's input and counts, and the permutation's ``arange`` 8Tk. With narrow experts
    and k <= 2 the block's input norm tops both, once the block's saved bytes and the norm's output and cast are
    freed: ``LlamaRMSNorm``'s backward holds five fp32 tensors of T*h (the gradient through the rstd product and
    the mean's, pow's and the product's), 20Th - saved - 2p*Th - 4T (its rstd)."""
    T, k, h, p, q = m.T, m.k, m.h, m.p, m.q
    grads = 3 * q * T * k * h
    norm = 20 * T * h - _moe_saved(m) - 2 * p * T * h - 4 * T
    if not ckpt:
        return grad_hidden + max(grads + (p * T * k * h - 8 * T * k if q != p else 0), norm)
    recompute = 2 * q * T * k * h + p * T * h + p * T * m.E + m.w * T * k + 20 * T * k + 4 * m.E
    return grad_hidden + max(grads, recompute, norm)


def _attention_peak(shape: ModelShape, T: int, p: int) -> int:
    """Live at the attention's own forward peak under checkpointing, which can top the MLP's or the sparse
    block's (narrow experts; qwen3's q wider than h). At ``apply_rotary_pos_emb`` of q: the norm's output p*Th, q,
    k and v, and ``q * cos``, ``rotate_half(q)`` and its product with sin: p*T*(h + 4 a*d + 2 kv*d). qwen3's
    ``q_norm`` before it: the norm's output, q, its fp32 copy and the fp32 product with the rstd, and the fp32
    mean and rstd per head: p*Th + (p + 8)*T*a*d + 8*T*a."""
    h, qd = shape.hidden_size, shape.q_hidden_size
    rotary = p * T * (h + 4 * qd + 2 * shape.kv_hidden_size)
    q_norm = p * T * h + (p + 8) * T * qd + 8 * T * shape.num_heads if shape.family != "mixtral" else 0
    return max(rotary, q_norm)


def _moe(shape: ModelShape, config: dict, b: int, s: int, p: int) -> _Moe:
    x = shape.extra
    mixtral = shape.family == "mixtral"
    return _Moe(T=b * s, s=s, h=shape.hidden_size, p=p, E=x["num_experts"], k=x["top_k"], ie=x["expert_size"],
                w=4 if mixtral else p, q=4 if mixtral else p,
                norm_topk=mixtral or bool(config.get("norm_topk_prob", False)))


def moe_profile(dense: ActivationProfile, parts: Dense, shape: ModelShape, config: dict, b: int, s: int,
                p: int) -> ActivationProfile:
    """``dense`` (the llama-like closed form of ``shape``) with qwen3's q/k norms and the sparse blocks.

    A model with dense and sparse layers (qwen3_moe's ``mlp_only_layers``, ``decoder_sparse_step`` > 1) gets
    the larger layer for every layer, and every transient's larger candidate (the traced profile instead takes
    its second layer as every layer's). Eager attention's transients, taken once the MLP's saved bytes are
    freed, count the sparse block's saved bytes instead of the dense MLP's.
    """
    T = b * s
    qk = qk_norm_saved(shape, T, p) if shape.family != "mixtral" else 0
    sparse = bool(shape.extra.get("sparse_layers"))
    if not sparse:
        layer = dense.layer_saved_bytes + qk
        ckpt_fwd = max(dense.ckpt_layer_forward_transient_bytes, _attention_peak(shape, T, p))
        return replace(dense, layer_saved_bytes=layer, all_layers_saved_bytes=shape.num_layers * layer,
                       ckpt_layer_forward_transient_bytes=ckpt_fwd)
    m = _moe(shape, config, b, s, p)
    moe = _moe_saved(m)
    dense_layer = dense.layer_saved_bytes + qk
    moe_layer = dense_layer - parts.mlp_saved + moe
    mixed = len(shape.extra["sparse_layers"]) < shape.num_layers
    layer = max(moe_layer, dense_layer) if mixed else moe_layer
    drop = moe - parts.mlp_saved  # eager's transients: the sparse block's saved bytes are freed, not the MLP's
    if mixed:  # a dense layer frees the MLP's: the larger of the two
        drop = min(drop, 0)
    eager_fwd, eager_ckpt, eager_bwd = parts.eager or (0, 0, 0)
    gh = dense.grad_hidden_bytes
    fwd = max(parts.fwd, eager_fwd - (drop if parts.eager else 0), _moe_forward(m) + parts.mask)
    ckpt_fwd = max(eager_ckpt, _moe_ckpt_forward(m), parts.ckpt_fwd if mixed else 0, _attention_peak(shape, T, p))
    bwd_eager = gh + eager_bwd - drop if parts.eager else 0
    bwd = max(bwd_eager, _moe_backward(m, gh, False), parts.bwd if mixed else 0)
    ckpt_bwd = max(bwd_eager, _moe_backward(m, gh, True), parts.bwd if mixed else 0)
    profile = replace(dense, layer_saved_bytes=layer, all_layers_saved_bytes=shape.num_layers * layer,
                      layer_forward_transient_bytes=fwd, ckpt_layer_forward_transient_bytes=ckpt_fwd,
                      layer_backward_transient_bytes=bwd, ckpt_layer_backward_transient_bytes=ckpt_bwd)
    if not config.get("output_router_logits", False):
        return profile
    return _aux_loss(profile, m, len(shape.extra["sparse_layers"]))


def _aux_loss(profile: ActivationProfile, m: _Moe, n: int) -> ActivationProfile:
    """``output_router_logits``: the load-balancing loss over the n sparse layers' router logits
    (modeling_<family>.py ``load_balancing_loss_func``, added to the loss by ``*ForCausalLM.forward``).

    Every layer's logits p*TE stay alive from its router to the end of forward (``OutputRecorder``), and the
    loss's ``softmax`` over each saves its output p*TE; its fp32 sums are 4E + 4 bytes. Head: + 2n*p*TE + 4E + 4.
    A layer's forward sees the n - 1 earlier layers' logits; in backward the loss has already sent every layer's
    logits their gradient (p*TE each), which waits for that layer: n - 1 over the hidden gradient between layers,
    n at a layer's backward. The cross-entropy's peak and the head's backward peak come before the aux loss's
    tensors (n*p*TE + 4E + 4 less over the head's saved bytes; 8 bytes of its own more at the loss's peak)."""
    logits = m.p * m.T * m.E
    scalars = 4 * m.E + 4
    return replace(
        profile, head_saved_bytes=profile.head_saved_bytes + 2 * n * logits + scalars,
        loss_transient_bytes=profile.loss_transient_bytes - n * logits - scalars + 8,
        backward_head_transient_bytes=profile.backward_head_transient_bytes - n * logits - scalars,
        layer_forward_transient_bytes=profile.layer_forward_transient_bytes + (n - 1) * logits,
        ckpt_layer_forward_transient_bytes=profile.ckpt_layer_forward_transient_bytes + (n - 1) * logits,
        grad_hidden_bytes=profile.grad_hidden_bytes + (n - 1) * logits,
        layer_backward_transient_bytes=profile.layer_backward_transient_bytes + n * logits,
        ckpt_layer_backward_transient_bytes=profile.ckpt_layer_backward_transient_bytes + n * logits)

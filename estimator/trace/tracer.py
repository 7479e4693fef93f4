"""The traced activation profile: run the real HF model on the meta device and count what autograd keeps.

The model is built from its config.json with 2 decoder layers on ``torch.device("meta")`` in the run's dtype,
and one forward (HF ``ForCausalLMLoss`` included) and backward run under a ``TorchDispatchMode`` that numbers
every tensor storage created and sees it freed, and under ``torch.autograd.graph.saved_tensors_hooks`` that
sees every tensor saved for backward. Meta tensors have no data pointer, so storages are told apart by the
address of their ``StorageImpl`` (``untyped_storage()._cdata``), unique while the storage lives. Module hooks
mark where the embeddings, each layer, the head and the loss begin and end, in forward and (through tensor
hooks on each layer's output and input) in backward. Layer 1 of the 2 is the steady-state layer; what layer 0
saves beyond it (rotary cos/sin shared by all layers) goes to the embeddings. Parameter gradients (also the
transposed weight gradients that ``AccumulateGrad`` copies into ``.grad``, and a tied weight's partial
gradients waiting in autograd's input buffer) are left out: the timeline counts them as gradients.

Kernels: on meta, ``F.scaled_dot_product_attention`` would take the math path (fp32 probabilities), so it is
replaced by the kernel the target device runs (``_kernels``). ``target="cuda"`` follows what torch 2.11 picked
on an H100 (``torch._fused_sdp_choice``, checked by benchmarks/cuda_check_activations.py): fp16/bf16 attention
runs cuDNN (``_scaled_dot_product_cudnn_attention``: saves q, k, v, the output and fp32 stats b*a*s, GQA
without repeating k/v, dropout as an RNG state), the same bytes as FlashAttention-2; fp32 runs the
memory-efficient kernel for multi-head attention and the math path for GQA; ``F.dropout`` becomes
``native_dropout`` with a 1-byte mask. ``target="cpu"`` mimics the CPU's choices
(``_scaled_dot_product_flash_attention_for_cpu`` without dropout, math with it; dropout noise in the input
dtype), so a trace can be checked byte for byte against a real CPU run. ``attn="flash"`` (flash_attention_2,
not runnable off-GPU) is traced as sdpa with the cuDNN kernel forced: flash-attn's ``FlashAttnFunc`` saves the
same q, k, v, output and fp32 softmax_lse (b, a, s).

The trace runs at three shapes so that every storage's size becomes a monomial in (micro_batch, seq_len)
(``profile_cache``); the polynomials are cached on disk and evaluated for any shape.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import weakref

import zeroest.estimator.trace.cache as pc
from zeroest.estimator.core.shape import ModelShape

log = logging.getLogger(__name__)

TRACE_LAYERS = 2
"""Decoder layers in the traced copy: layer 1 is the steady state, layer 0 also carries what layers share."""
BASE_BATCH, BASE_SEQ = 2, 64
"""The three traces run at (2, 64), (4, 64) and (2, 128) tokens; sliding-window models with a longer sequence
than their window trace at (2, s) instead, so that the same masked kernels run."""
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
EXTRA_KEYS = (
    "hidden_act", "activation_function", "hidden_activation", "sliding_window", "use_sliding_window",
    "mlp_bias",
    "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout", "attention_dropout", "hidden_dropout",
    "activation_dropout", "partial_rotary_factor", "rope_theta", "rope_scaling",
)
"""``ModelShape.extra`` keys copied by ``hf_config`` into a rebuilt config: they change saved activations."""


def hf_config(shape: ModelShape) -> dict:
    """The HF config.json dict of ``shape``: ``shape.extra["config"]`` if present, else rebuilt from fields.

    Rebuilt configs take from ``shape.extra`` the keys in ``EXTRA_KEYS`` when present (activation, dropout
    probabilities, sliding window, rotary fraction, ...) and otherwise keep HF's defaults for the family
    (transformers 5.24 ``configuration_<family>.py``), which match the published checkpoints' configs.
    """
    if isinstance(shape.extra.get("config"), dict):
        return dict(shape.extra["config"])
    s, x = shape, shape.extra
    cfg: dict = {"model_type": s.family, "vocab_size": s.vocab_size, "tie_word_embeddings": s.tied_embeddings}
    if s.family == "gpt2":
        cfg.update(n_embd=s.hidden_size, n_layer=s.num_layers, n_head=s.num_heads,
                   n_inner=s.intermediate_size, n_positions=s.max_positions)
    elif s.family == "opt":
        cfg.update(hidden_size=s.hidden_size, ffn_dim=s.intermediate_size, num_hidden_layers=s.num_layers,
                   num_attention_heads=s.num_heads, max_position_embeddings=s.max_positions,
                   enable_bias=s.attention_bias,
                   word_embed_proj_dim=x.get("word_embed_proj_dim", s.hidden_size),
                   do_layer_norm_before=x.get("do_layer_norm_before", True),
                   _remove_final_layer_norm=x.get("remove_final_layer_norm", False),
                   layer_norm_elementwise_affine=x.get("layer_norm_elementwise_affine", True))
    else:
        cfg.update(hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                   num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
                   max_position_embeddings=s.max_positions)
        if s.family == "gpt_neox":
            cfg.update(attention_bias=s.attention_bias, rotary_pct=x.get("rotary_pct", 0.25),
                       use_parallel_residual=x.get("use_parallel_residual", True))
        else:
            cfg.update(num_key_value_heads=s.num_kv_heads, head_dim=s.head_dim)
        if s.family in ("llama", "gemma"):
            cfg["attention_bias"] = s.attention_bias
        if s.family == "phi3":  # Phi3Config's default pad id 32000 must lie inside the vocabulary
            cfg["pad_token_id"] = None if s.vocab_size <= 32000 else 32000
    cfg.update({key: x[key] for key in EXTRA_KEYS if key in x})
    return cfg


@functools.lru_cache(maxsize=1)
def _recorder_class():
    """The dispatch-mode recorder, built on first use so that torch is imported lazily."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Recorder(TorchDispatchMode):
        """Numbers new storages on ``device`` (``sizes[serial]``); logs allocs (serial), frees (~serial)."""

        def __init__(self, device: str) -> None:
            super().__init__()
            self.device = device
            self.serial_of: dict[int, int] = {}
            self.sizes: list[int] = []
            self.events: list[int] = []
            self.marks: list[tuple[int, str]] = []

        def track(self, tensor) -> int | None:
            if tensor.device.type != self.device:
                return None
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in self.serial_of:
                return None if self.serial_of[key] < 0 else self.serial_of[key]
            serial = len(self.sizes)
            self.serial_of[key] = serial
            self.sizes.append(storage.nbytes())
            self.events.append(serial)
            weakref.finalize(storage, self._free, key)
            return serial

        def _free(self, key: int) -> None:
            serial = self.serial_of.pop(key, None)
            if serial is not None:
                self.events.append(~serial)

        def serial(self, tensor) -> int | None:
            if tensor.device.type != self.device:
                return None
            serial = self.serial_of.get(tensor.untyped_storage()._cdata)
            return None if serial is None or serial < 0 else serial

        def skip(self, tensor) -> None:
            """Never count this storage (model weights and buffers: they are not activations)."""
            if tensor.device.type == self.device:
                self.serial_of[tensor.untyped_storage()._cdata] = -1

        def mark(self, name: str) -> None:
            self.marks.append((len(self.events), name))

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for leaf in tree_leaves(out):
                if isinstance(leaf, __import__("torch").Tensor):
                    self.track(leaf)
            return out

    return Recorder


@contextlib.contextmanager
def _kernels(target: str, force_flash: bool):
    """Route attention and dropout on meta tensors to the kernels ``target`` runs (see the module docstring).

    CUDA (torch 2.11 on an H100, probed with ``torch._fused_sdp_choice``): fp16/bf16 attention takes cuDNN
    (saves q, k, v, out, fp32 stats b*a*s and the additive mask if any; GQA native), the same bytes as
    FlashAttention-2; fp32 takes the memory-efficient kernel for multi-head attention and the math path for
    GQA.
    """
    import torch
    import torch.nn.functional as F

    aten = torch.ops.aten
    orig_sdpa, orig_dropout = F.scaled_dot_product_attention, F.dropout

    def additive(mask, dtype):
        if mask is None or mask.dtype != torch.bool:
            return mask
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask.logical_not(), float("-inf"))

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        args = (query, key, value)
        if query.device.type == "meta" and target == "cuda" and query.size(-1) <= 256 and (
                force_flash or query.dtype in (torch.float16, torch.bfloat16)):
            bias = additive(attn_mask, query.dtype)
            return aten._scaled_dot_product_cudnn_attention(*args, bias, True, dropout_p, is_causal, False,
                                                           scale=scale)[0]
        if query.device.type == "meta" and target == "cuda" and key.size(1) == query.size(1):
            bias = additive(attn_mask, query.dtype)
            return aten._scaled_dot_product_efficient_attention(*args, bias, True, dropout_p, is_causal,
                                                               scale=scale)[0]
        if query.device.type == "meta" and target == "cpu" and dropout_p == 0.0:
            bias = additive(attn_mask, query.dtype)
            return aten._scaled_dot_product_flash_attention_for_cpu(*args, 0.0, is_causal, attn_mask=bias,
                                                                    scale=scale)[0]
        return orig_sdpa(*args, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                         enable_gqa=enable_gqa)

    def dropout(input, p=0.5, training=True, inplace=False):  # noqa: A002 (torch's own signature)
        if target == "cuda" and input.device.type == "meta" and training and 0.0 < p < 1.0 and not inplace:
            return torch.native_dropout(input, p, True)[0]
        return orig_dropout(input, p, training, inplace)

    F.scaled_dot_product_attention, F.dropout = sdpa, dropout
    try:
        yield
    finally:
        F.scaled_dot_product_attention, F.dropout = orig_sdpa, orig_dropout


@contextlib.contextmanager
def _no_data_checks():
    """HF's packed-sequence check reads tensor values (``.all()``), which meta tensors lack; none is packed
    here."""
    from transformers import masking_utils

    orig = getattr(masking_utils, "find_packed_sequence_indices", None)
    if orig is not None:
        masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        if orig is not None:
            masking_utils.find_packed_sequence_indices = orig


def build_model(config: dict, dtype: str, attn: str, device: str = "meta",
                num_layers: int | None = TRACE_LAYERS):
    """``AutoModelForCausalLM.from_config`` in ``dtype`` with ``attn`` on ``device``, train mode, no KV cache.

    ``num_layers`` replaces the config's depth (None keeps it). ``attn="flash"`` builds the sdpa model: the
    tracer forces the flash-like kernel for it.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    family = cfg.pop("model_type")
    if num_layers is not None:
        cfg["n_layer" if family == "gpt2" else "num_hidden_layers"] = num_layers
    hf = AutoConfig.for_model(family, **cfg)
    hf.use_cache = False
    impl = {"sdpa": "sdpa", "flash": "sdpa", "eager": "eager"}[attn]
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf, dtype=getattr(torch, _DTYPES[dtype]),
                                                 attn_implementation=impl)
    model.config.use_cache = False
    return model.train()


def set_checkpointing(model, on: bool) -> None:
    """HF non-reentrant checkpointing on or off (``activation_checkpointing_enable`` from transformers 5.2x,
    the deprecated ``gradient_checkpointing_enable`` before it; the same checkpoint function)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_disable()


def decoder_layers(model) -> list:
    """The model's decoder layers, in order (``model.layers``, ``transformer.h`` or ``decoder.layers``)."""
    base = model.base_model
    for path in ("layers", "h", "decoder.layers"):
        obj = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None:
            return list(obj)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}: is it a supported family?")


def run_trace(model, input_ids, *, grad_ckpt: bool, target: str = "cuda",
              force_flash: bool = False) -> pc.Trace:
    """One forward (with HF's loss on ``labels=input_ids``) and backward of ``model``, recorded.

    Works on meta and on real tensors (the tests run it on CPU). The output object is dropped right after the
    forward, as a training loop that keeps only ``.loss`` does.
    """
    import torch
    from torch.utils._pytree import tree_leaves

    device = input_ids.device.type
    rec = _recorder_class()(device)
    set_checkpointing(model, grad_ckpt)
    region, state, saved, excluded = ["embed"], {"backward": False}, {}, set()
    special: dict[str, int | None] = {"logits": None, "grad_logits": None}

    def note(tensor, where: str) -> None:
        serial = rec.serial(tensor)
        if serial is not None and serial not in saved:
            saved[serial] = where

    def pack(tensor):
        note(tensor, region[0])
        return tensor

    def layer_pre(i):
        def hook(module, args, kwargs):
            if state["backward"]:
                return
            region[0] = f"layer{i}"
            rec.mark(f"layer{i}_fwd_start")
            if grad_ckpt:  # non-reentrant checkpointing keeps the layer call's tensor arguments
                for leaf in tree_leaves((args, kwargs)):
                    if isinstance(leaf, torch.Tensor):
                        note(leaf, region[0])
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.requires_grad:
                hidden.register_hook(lambda grad: rec.mark(f"layer{i}_bwd_end"))

        return hook

    def layer_post(i):
        def hook(module, args, kwargs, output):
            if state["backward"]:
                return
            rec.mark(f"layer{i}_fwd_end")
            region[0] = "head"
            out = output[0] if isinstance(output, tuple) else output
            out.register_hook(lambda grad: rec.mark(f"layer{i}_bwd_start"))

        return hook

    def head_post(module, args, output):
        if state["backward"]:
            return
        region[0] = "loss"
        special["logits"] = rec.serial(output)
        output.register_hook(lambda grad: special.__setitem__("grad_logits", rec.serial(grad)))

    handles = [model.get_output_embeddings().register_forward_hook(head_post)]
    for i, layer in enumerate(decoder_layers(model)):
        handles.append(layer.register_forward_pre_hook(layer_pre(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(layer_post(i), with_kwargs=True))
    for param in model.parameters():
        handles.append(param.register_hook(lambda grad: excluded.add(rec.serial(grad))))
    checks = _no_data_checks() if device == "meta" else contextlib.nullcontext()
    try:
        with rec, _kernels(target, force_flash), checks:
            for tensor in (*model.parameters(), *model.buffers()):
                rec.skip(tensor)
            rec.track(input_ids)
            rec.mark("fwd_start")
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                out = model(input_ids=input_ids, labels=input_ids, use_cache=False)
            rec.mark("fwd_end")
            handles += param_grad_hooks(out.loss, lambda grad: excluded.add(rec.serial(grad)))
            loss = out.loss
            del out
            rec.mark("bwd_start")
            state["backward"] = True
            loss.backward()
            rec.mark("bwd_end")
    finally:
        for handle in handles:
            handle.remove()
    excluded.update(rec.serial(p.grad) for p in model.parameters() if p.grad is not None)
    for param in model.parameters():
        param.grad = None
    marks = {name: at for at, name in rec.marks}
    return pc.Trace(sizes=list(rec.sizes), events=list(rec.events), marks=marks, saved=saved,
                    logits=special["logits"], grad_logits=special["grad_logits"], excluded=excluded - {None})


def param_grad_hooks(loss, on_grad) -> list:
    """Call ``on_grad(tensor)`` with every gradient that flows into a parameter's ``AccumulateGrad``.

    Hooks the backward nodes with an edge to an ``AccumulateGrad`` (a linear's ``TBackward``, an embedding's
    backward): a tied weight's gradients wait in autograd's input buffer until all of them are summed, and
    both the parts and their sum are parameter gradients, not activations.
    """
    handles, seen, todo = [], set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        slots = [i for i, (nxt, _) in enumerate(node.next_functions)
                 if nxt is not None and type(nxt).__name__ == "AccumulateGrad"]
        if slots:
            def hook(grad_inputs, grad_outputs, slots=slots):
                for i in slots:
                    if grad_inputs[i] is not None:
                        on_grad(grad_inputs[i])
            handles.append(node.register_hook(hook))
        todo.extend(nxt for nxt, _ in node.next_functions)
    return handles


def _regime_seq(config: dict, attn: str, seq_len: int) -> int | None:
    """The base sequence length of the traces: None for the usual (64); ``seq_len`` when an sdpa model with a
    sliding window gets a sequence at least as long as the window (HF then builds an explicit mask:
    masking_utils ``_ignore_causal_mask_sdpa``), so that the masked kernels are the ones traced."""
    window = config.get("sliding_window")
    if attn == "sdpa" and window and seq_len >= window and config.get("use_sliding_window", True):
        return seq_len
    return None


def trace_polys(config: dict, dtype: str, attn: str, *, target: str = "cuda",
                seq_len: int = BASE_SEQ) -> dict:
    """Trace both modes (plain, checkpointed) at three shapes on meta; fit per-storage monomials; analyze."""
    import torch

    config = dict(config)
    if attn == "flash":  # flash-attn handles sliding windows inside the kernel, with no mask tensor
        config.pop("sliding_window", None)
    window = config.get("sliding_window") if attn == "sdpa" else None
    below = min(BASE_SEQ, max(2, (window - 1) // 2)) if window else BASE_SEQ  # 2 * s0 stays under the window
    s0 = _regime_seq(config, attn, seq_len) or below
    b0 = BASE_BATCH
    model = build_model(config, dtype, attn)
    entry: dict = {"b0": b0, "s0": s0}
    for mode, ckpt in (("plain", False), ("ckpt", True)):
        traces = [
            run_trace(model, torch.zeros((b, s), dtype=torch.long, device="meta"), grad_ckpt=ckpt,
                      target=target, force_flash=attn == "flash")
            for b, s in ((b0, s0), (2 * b0, s0), (b0, 2 * s0))
        ]
        if len({len(t.sizes) for t in traces}) != 1:
            raise RuntimeError("traces of different shapes made different numbers of storages: cannot scale")
        terms = pc.fit_terms(traces[0].sizes, traces[1].sizes, traces[2].sizes, b0, s0)
        entry[mode] = pc.analyze(traces[0], terms)
    return entry


_MEMO: dict[str, dict] = {}


@functools.lru_cache(maxsize=1)
def _library_versions() -> dict[str, str]:
    """torch's and transformers' versions for the cache key, read from their files without importing them
    (``importlib.metadata`` takes ~25 ms, importing torch seconds)."""
    import importlib.util
    import re
    from pathlib import Path

    versions = {}
    for name, file in (("torch", "version.py"), ("transformers", "__init__.py")):
        spec = importlib.util.find_spec(name)
        text = Path(spec.origin).with_name(file).read_text()[:20000] if spec and spec.origin else ""
        found = re.search(r"^__version__\s*(?::\s*str\s*)?=\s*['\"]([^'\"]+)['\"]", text, re.M)
        if found:
            versions[name] = found.group(1)
        else:
            from importlib.metadata import version

            versions[name] = version(name)
    return versions


def traced_profile(shape: ModelShape, micro_batch: int, seq_len: int, dtype: str = "bf16",
                   attn: str = "sdpa", *, target: str = "cuda", config: dict | None = None,
                   use_cache: bool = True):
    """The ``ActivationProfile`` of ``shape`` traced on the meta device (see the module docstring).

    ``config`` is the HF config.json dict (default ``hf_config(shape)``); ``target`` the device whose kernels
    are mimicked ("cuda" or "cpu"). Traces are cached on disk (``profile_cache``) keyed by config, dtype,
    attention, target and library versions, as polynomials in (micro_batch, seq_len), so other shapes need no
    new trace; a cached profile is read without importing torch.
    """
    if attn not in ("sdpa", "flash", "eager"):
        raise ValueError(f"unknown attention {attn!r}: use sdpa, flash or eager")
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use bf16, fp16 or fp32")
    config = dict(config or hf_config(shape))
    regime = _regime_seq(config, attn, seq_len)
    depth = ("n_layer", "num_hidden_layers")
    key = pc.cache_key({"config": {k: v for k, v in config.items() if k not in depth}, "dtype": dtype,
                        "attn": attn, "target": target, "regime": regime, **_library_versions()})
    entry = (_MEMO.get(key) or pc.load(key)) if use_cache else None
    if entry is None:
        start = time.perf_counter()
        entry = trace_polys(config, dtype, attn, target=target, seq_len=seq_len)
        log.info(f"traced {shape.name} ({dtype}, {attn}) in {time.perf_counter() - start:.2f} s")
        if use_cache:
            pc.store(key, entry)
            entry = pc.decode(pc.encode(entry))
    _MEMO[key] = entry
    return pc.profile_from_polys(entry, micro_batch, seq_len, shape.num_layers)

"""Recording one training step: a ``TorchDispatchMode`` that numbers storages, hooks that mark the regions.

``run_trace`` runs one forward (HF ``ForCausalLMLoss`` included) and backward under a ``TorchDispatchMode``
that numbers every tensor storage created and sees it freed, and under
``torch.autograd.graph.saved_tensors_hooks`` that sees every tensor saved for backward. Meta tensors have no
data pointer, so storages are told apart by the address of their ``StorageImpl``
(``untyped_storage()._cdata``), unique while the storage lives. Module hooks mark where the embeddings, each
layer, the head and the loss begin and end, in forward and (through tensor hooks on each layer's output and
input) in backward, and where the first parameter gradient reaches its ``AccumulateGrad`` (where DeepSpeed's
first gradient hook allocates its reduce buckets; the node that made the gradient has freed its inputs).
Parameter gradients (also the transposed weight gradients that ``AccumulateGrad`` copies into ``.grad``, and a
tied weight's partial gradients waiting in autograd's input buffer) are left out: the timeline counts them as
gradients.

Kernels: on meta, ``F.scaled_dot_product_attention`` would take the math path (fp32 probabilities), so it is
replaced by the kernel the target device runs (``_kernels``). ``target="cuda"`` follows what torch 2.11 picked
on an H100 (``torch._fused_sdp_choice``, checked by benchmarks/cuda_check_activations.py): fp16/bf16 attention
runs cuDNN (``_scaled_dot_product_cudnn_attention``: saves q, k, v, the output and fp32 stats b*a*s, GQA
without repeating k/v, dropout as an RNG state), the same bytes as FlashAttention-2; fp32 runs the
memory-efficient kernel for multi-head attention and the math path for GQA; ``F.dropout`` becomes
``native_dropout`` with a 1-byte mask. ``target="cpu"`` mimics the CPU's choices
(``_scaled_dot_product_flash_attention_for_cpu`` without dropout and with one head size for q, k and v, math
otherwise, e.g. latent attention's v narrower than q/k; dropout noise in the input dtype), so a trace can be
checked byte for byte against a real CPU run. ``attn="flash"`` (flash_attention_2, not runnable off-GPU) is
traced as sdpa with the cuDNN kernel forced: flash-attn's ``FlashAttnFunc`` saves the same q, k, v, output and
fp32 softmax_lse (b, a, s).
"""

from __future__ import annotations

import contextlib
import functools
import weakref

from zeroest.estimator.trace.model import decoder_layers, set_checkpointing
from zeroest.estimator.trace.polys import Trace

_GEMMS = frozenset({"mm", "addmm", "bmm", "baddbmm", "_scaled_mm"})
"""aten ops that run a cuBLAS GEMM: the first of forward and of backward is marked (``first_gemm_fwd``,
``first_gemm_bwd``), where a GPU run's caching allocator makes cuBLAS's workspace for that thread's handle."""


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
            self.phase = "fwd"
            self.gemm_marked: set[str] = set()

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
            if self.phase not in self.gemm_marked and func.overloadpacket.__name__ in _GEMMS:
                self.gemm_marked.add(self.phase)  # after the output: where cuBLAS takes its workspace on a GPU
                self.mark(f"first_gemm_{self.phase}")
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
        same_dims = query.size(-1) == key.size(-1) == value.size(-1)  # sdp_utils_cpp.cpp check_head_dim_size_cpp
        if query.device.type == "meta" and target == "cpu" and dropout_p == 0.0 and same_dims:
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


def run_trace(model, input_ids, *, grad_ckpt: bool, target: str = "cuda",
              force_flash: bool = False, zero3_hooks: bool = False) -> Trace:
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

    holds = None  # stage 3: saved views of a parameter's storage (trace.zero3_hooks.ParamHolds)

    def pack(tensor):
        note(tensor, region[0])
        return holds.pack(tensor) if holds is not None else tensor

    def unpack(packed):
        return holds.unpack(packed) if holds is not None else packed

    def layer_pre(i):
        def hook(module, args, kwargs):
            if state["backward"]:
                return
            region[0] = f"layer{i}"
            rec.mark(f"layer{i}_fwd_start")
            if grad_ckpt:  # non-reentrant checkpointing keeps the layer call's tensor arguments: the layer's
                # bytes. Where HF checkpoints ``__call__`` (transformers before 5.2x) this hook runs inside the
                # checkpoint, whose machinery has already saved them under the gap before the layer ("embed" or
                # the previous layer's "head"); one that an earlier layer keeps (rotary cos/sin) stays its
                for leaf in tree_leaves((args, kwargs)):
                    serial = rec.serial(leaf) if isinstance(leaf, torch.Tensor) else None
                    if serial is not None and saved.get(serial, "head") in ("embed", "head"):
                        saved[serial] = region[0]
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
            if out.requires_grad:  # a frozen layer above frozen ones has no backward
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
    if zero3_hooks:
        from zeroest.estimator.trace.zero3_hooks import ParamHolds
        from zeroest.estimator.trace.zero3_hooks import zero3_hooks as hooks

        handles += hooks(model, rec.mark, state)
        holds = ParamHolds(model, rec.mark)

    def on_grad(grad) -> None:
        excluded.add(rec.serial(grad))

    def on_accumulate(grad) -> None:  # AccumulateGrad's pre-hook: the producing node has dropped its inputs
        on_grad(grad)
        if state["backward"] and not state.get("first_grad"):
            state["first_grad"] = True
            rec.mark("first_grad")

    for param in model.parameters():
        if param.requires_grad:
            handles.append(param.register_hook(on_accumulate))
    checks = _no_data_checks() if device == "meta" else contextlib.nullcontext()
    try:
        with rec, _kernels(target, force_flash), checks:
            for tensor in (*model.parameters(), *model.buffers()):
                rec.skip(tensor)
            rec.track(input_ids)
            rec.mark("fwd_start")
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                out = model(input_ids=input_ids, labels=input_ids, use_cache=False)
            rec.mark("fwd_end")
            handles += param_grad_hooks(out.loss, on_grad)
            loss = out.loss
            del out
            rec.mark("bwd_start")
            state["backward"] = True
            rec.phase = "bwd"
            loss.backward()
            seen = {name for _, name in rec.marks}
            for i in range(len(decoder_layers(model))):  # layers without a backward: empty windows at the end
                for name in (f"layer{i}_bwd_start", f"layer{i}_bwd_end"):
                    if name not in seen:
                        rec.mark(name)
            rec.mark("bwd_end")
    finally:
        for handle in handles:
            handle.remove()
    excluded.update(rec.serial(p.grad) for p in model.parameters() if p.grad is not None)
    for param in model.parameters():
        param.grad = None
    marks = {name: at for at, name in rec.marks}
    last = f"layer{len(decoder_layers(model)) - 1}_bwd_start"
    if last in marks:  # a model whose first gradient comes inside the layers: an empty window
        marks["first_grad"] = min(marks.get("first_grad", marks[last]), marks[last])
    return Trace(sizes=list(rec.sizes), events=list(rec.events), marks=marks, saved=saved,
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


def replay(trace: Trace) -> dict[str, int]:
    """A recorded step replayed event by event, every storage counted where it is made and freed (parameter
    gradients left out, as the profile leaves them): the saved bytes of the embeddings and layers still alive at
    the end of forward (``stack``), the live bytes there (``forward_end``), at forward's peak and at backward's.
    The reference the per-kind profile is checked against (tests/test_layer_kinds.py,
    benchmarks/layer_kinds_check.py) when ``trace`` covers every layer."""
    alive: set[int] = set()
    live = peak = 0
    out: dict[str, int] = {}
    for index, event in enumerate(trace.events):
        if index == trace.marks["fwd_end"]:
            out["forward_end"], out["forward_peak"] = live, peak
            out["stack"] = sum(trace.sizes[s] for s, region in trace.saved.items()
                               if s in alive and s not in trace.excluded and region not in ("head", "loss"))
        if index == trace.marks["bwd_start"]:
            peak = live
        serial = event if event >= 0 else ~event
        size = 0 if serial in trace.excluded else trace.sizes[serial]
        (alive.add if event >= 0 else alive.discard)(serial)
        live += size if event >= 0 else -size
        peak = max(peak, live)
    out["backward_peak"] = peak
    return out

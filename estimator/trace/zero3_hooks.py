"""ZeRO-3's module hooks as a trace must see them: where stage 3 gathers and releases each module's parameters.

DeepSpeed 0.19.8 hooks every module (runtime/zero/parameter_offload.py ``_register_deepspeed_module``): a forward
pre-hook fetches the module's own parameters, a forward hook releases them, ``PreBackwardFunctionForModule`` on its
outputs fetches them again in backward and ``PostBackwardFunctionModule`` on its inputs releases them. The recorder
(``trace.recorder.run_trace(..., zero3_hooks=True)``) marks each of those points, and ``core.zero3_requests`` places
the gathers and releases there.
"""

from __future__ import annotations

import functools

from zeroest.estimator.trace.model import decoder_layers

LEAF_CLASSES = ("transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock",
                "transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock",
                "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock")
"""The modules DeepSpeed 0.19.8 makes ZeRO-3 leaves by default (runtime/zero/leaf_module_config.py
``DEFAULT_LEAF_MODULE_CLASSES``, applied by engine.py ``apply_zero_leaf_module_config``): one fetch gathers all
their parameters, no hook is installed below them."""


def is_leaf(module) -> bool:
    """Whether ``module`` is of a class in ``LEAF_CLASSES``."""
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}" in LEAF_CLASSES


def module_marks(model) -> list[tuple[str, int, object, str]]:
    """Every module of the model in ``named_modules`` order, as (mark prefix, index, module, name): ``layer{i}_`` and
    the module's index inside decoder layer i (the layer itself 0), ``top_`` and its index among the others (the
    root 0). ZeRO-3 hooks every module (parameter_offload.py ``_register_deepspeed_module``) and gathers each one's
    own parameters (``fetch_sub_module``: ``iter_params(module, recurse=False)``); a module without parameters is
    still a step of its trace."""
    layer_of = {id(m): i for i, layer in enumerate(decoder_layers(model)) for m in layer.modules()}
    counts: dict[int | None, int] = {}
    out = []
    for name, module in model.named_modules():
        i = layer_of.get(id(module))
        k = counts[i] = counts.get(i, -1) + 1
        out.append((f"layer{i}_" if i is not None else "top_", k, module, name))
    return out


class _Marks:
    """Marks set at the recorder's current event (``mark_at``), each name once: a repeated one adds ``c{n}``."""

    def __init__(self, mark_at) -> None:
        self.mark_at = mark_at
        self.calls: dict[str, int] = {}

    def __call__(self, name: str) -> None:
        n = self.calls.get(name, 0)
        self.calls[name] = n + 1
        self.mark_at(name + (f"c{n}" if n else ""))


@functools.lru_cache(maxsize=1)
def _identity_function():
    """Identity autograd Functions that call back in backward, as ZeRO-3's ``PreBackwardFunctionForModule`` (on a
    module's outputs: each gradient that reaches one is a fetch) and ``PostBackwardFunctionModule`` (on its inputs:
    the last of their gradients is the release) do (torch imported on first use)."""
    import torch

    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, tensor, callback):
            ctx.callback = callback
            return tensor.detach()

        @staticmethod
        def backward(ctx, grad):
            ctx.callback()
            return grad, None

    return Identity


def zero3_hooks(model, mark_at, state) -> list:
    """Marks where ZeRO-3's hooks gather and release each module's parameters (``module_marks``), named
    ``{prefix}{phase}_{what}{k}``: ``fwd_pre`` / ``fwd_post`` around a forward call, ``bwd_rpre`` / ``bwd_rpost``
    around its recomputation under checkpointing, ``bwd_bpre`` at each gradient that reaches one of its outputs and
    ``bwd_bpost`` at the last gradient of its inputs that need one. As DeepSpeed does, the outputs and inputs are
    passed through identity autograd Functions, so that a module's inputs shared with another module (q, k and v)
    call back when this module's backward has made its own part. A repeated mark adds ``c{n}``. ``mark_at(name)``
    sets a mark at the recorder's current event; ``state["backward"]`` is true from the loss's backward on."""
    import torch
    from torch.utils._pytree import tree_map

    identity = _identity_function()
    marks = _Marks(mark_at)

    def mark(prefix: str, what: str, k: int) -> None:
        marks(f"{prefix}{'bwd' if what.startswith(('r', 'b')) else 'fwd'}_{what}{k}")

    handles = []
    for prefix, k, module, _ in module_marks(model):

        def pre(mod, args, kwargs, prefix=prefix, k=k):
            mark(prefix, "rpre" if state["backward"] else "pre", k)
            if state["backward"]:
                return None
            left = [0]

            def done() -> None:
                left[0] -= 1
                if left[0] == 0:
                    mark(prefix, "bpost", k)

            def wrap(t):
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    left[0] += 1
                    return identity.apply(t, done)
                return t

            return tree_map(wrap, args), tree_map(wrap, kwargs)

        def post(mod, args, kwargs, output, prefix=prefix, k=k):
            mark(prefix, "rpost" if state["backward"] else "post", k)
            if state["backward"]:
                return None
            return tree_map(lambda t: identity.apply(t, lambda: mark(prefix, "bpre", k))
                            if isinstance(t, torch.Tensor) and t.requires_grad else t, output)

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    return handles


class _Held:
    """A saved view of a parameter's storage, as the pack hook hands it to autograd."""

    __slots__ = ("tensor", "mark")

    def __init__(self, tensor, mark: str) -> None:
        self.tensor, self.mark = tensor, mark


class ParamHolds:
    """Saved tensors that are views of a parameter's storage (``weight[idx]`` of a MoE layer's 3-D expert weights,
    handed to stage 3's linear): autograd keeps the gathered storage alive through them after DeepSpeed's release
    (``free_param`` only points the parameter at an empty tensor), until backward unpacks them. Marked
    ``{prefix}fwd_hold{k}_{j}`` where saved and ``{prefix}bwd_drop{k}_{j}`` where unpacked, for parameter j of module
    k (``module_marks``). The parameter itself, saved whole, holds nothing: its ``.data`` is swapped."""

    def __init__(self, model, mark_at) -> None:
        self.mark = _Marks(mark_at)
        self.owner: dict[int, tuple[str, int, int]] = {}
        for prefix, k, module, _ in module_marks(model):
            for j, param in enumerate(module.parameters(recurse=False)):
                self.owner.setdefault(param.untyped_storage()._cdata, (prefix, k, j))
        self.params = {id(p) for p in model.parameters()}

    def pack(self, tensor):
        if id(tensor) in self.params:
            return tensor
        owner = self.owner.get(tensor.untyped_storage()._cdata)
        if owner is None:
            return tensor
        prefix, k, j = owner
        self.mark(f"{prefix}fwd_hold{k}_{j}")
        return _Held(tensor, f"{prefix}bwd_drop{k}_{j}")

    def unpack(self, packed):
        if isinstance(packed, _Held):
            self.mark(packed.mark)
            return packed.tensor
        return packed

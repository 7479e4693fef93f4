"""Kinds of decoder layer, read off the model built at full depth on the meta device, and the copy that traces them.

Many causal LMs do not repeat one layer: DeepSeek-V2/V3 put ``first_k_dense_replace`` dense MLPs below the
MoE layers, Qwen2/3-MoE make ``mlp_only_layers`` dense, Gemma2/3, Qwen3, GPT-OSS and others alternate sliding and
full attention (``layer_types``), Llama4 interleaves MoE and rope-less layers; LoRA and freezes by layer
(``core.adapters``) make layers that train differently. No family is named here: ``layout`` builds nothing
itself, it reads the model ``trace.model`` built with every decoder layer on ``torch.device("meta")`` (no
memory, parameters as transformers, peft and the freeze patterns leave them) and gives each layer a
signature (``signature``):

* its module classes and its parameters' names, shapes, dtypes and ``requires_grad`` (dense MLP or experts,
  LoRA-wrapped or frozen);
* its entry of every config list with one entry per layer (``layer_types``, ``no_rope_layers``, ...): the
  model's forward picks the mask by it (e.g. transformers 5.24 modeling_qwen3.py ``Qwen3Model.forward``:
  ``causal_mask_mapping[self.config.layer_types[i]]``);
* whether its input needs a gradient (plain mode): some parameter below it trains, or the input embeddings do
  (a frozen layer above frozen ones has no autograd graph at all, torch's generated autograd code saves a
  Linear's input only for a weight that needs a gradient: tools/autograd/derivatives.yaml ``mm``). The first
  layer of a structure counts as a later one of it would (its own difference goes to the embeddings, below).

Layers of one signature are a kind. The traced copy keeps, in the real order, the first two layers of each kind
(a kind of one layer is deep-copied to make its second): layer ``first`` of a kind also saves what the layers
of that kind share (rotary cos/sin, a mask), layer ``steady`` is every other layer of it. Every layer in the
copy sees the same gradient flow as the real layer it stands for: the first layer of every kind that trains
below it is in the copy too. The profile (``trace.polys.profile_from_polys``) then takes, with ``n_k`` real
layers of kind k and ``L_t`` the bytes copy layer t saves::

    embeddings = E + sum_k (L_first(k) - L_steady(k)),   layers = sum_k n_k * L_steady(k)

exact when every later layer of a kind saves what its steady layer does.
"""

from __future__ import annotations

import copy

from zeroest.estimator.trace.model import layer_owner

MAX_KINDS = 16
"""More kinds than this would trace a copy of more than 32 layers: a model whose layers all differ (an index
stored per layer, say) is refused with a ValueError, and the closed form is used."""


def per_layer_keys(config, num_layers: int) -> list[str]:
    """Keys of the HF config whose value is a list with one entry per decoder layer (``layer_types``, ...)."""
    return sorted(k for k, v in config.to_dict().items()
                  if isinstance(v, (list, tuple)) and len(v) == num_layers and num_layers > 1)


def _base(model):
    """The HF ``*ForCausalLM`` under a peft wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def signature(layer, config, keys: list[str], index: int) -> tuple:
    """What makes decoder layer ``index`` differ from others, except its input's gradient (see ``layout``)."""
    modules = tuple(type(m).__name__ for m in layer.modules())
    params = tuple((name, tuple(p.shape), str(p.dtype), p.requires_grad) for name, p in layer.named_parameters())
    entries = tuple((key, repr(getattr(config, key)[index])) for key in keys)
    return modules, params, entries


def layout(model) -> dict:
    """The kinds of decoder layer of ``model`` (built at full depth) and the copy that traces them.

    Returns a JSON-able dict: ``kinds`` (the kind of each real layer, numbered in the order they first come),
    ``picks`` (the real layer each copy layer is; a repeated index is a deep copy), ``first`` and ``steady``
    (per kind, the copy layers that stand for its first and every later layer).
    """
    hf = _base(model)
    owner, name = layer_owner(model)
    layers = getattr(owner, name)
    keys = per_layer_keys(hf.config, len(layers))
    embeddings_train = any(p.requires_grad for p in hf.get_input_embeddings().parameters())
    below = embeddings_train
    seen_structures: set[tuple] = set()
    signatures: list[tuple] = []
    for index, layer in enumerate(layers):
        structure = signature(layer, hf.config, keys, index)
        trains = any(p.requires_grad for p in layer.parameters())
        needs_input = below or (trains and structure not in seen_structures)
        seen_structures.add(structure)
        signatures.append((structure, needs_input))
        below = below or trains
    order: dict[tuple, int] = {}
    kinds = [order.setdefault(sig, len(order)) for sig in signatures]
    if len(order) > MAX_KINDS:
        raise ValueError(f"{len(order)} kinds of decoder layer (more than {MAX_KINDS}): too many to trace")
    members: list[list[int]] = [[] for _ in order]
    for index, kind in enumerate(kinds):
        members[kind].append(index)
    picks = sorted(i for m in members for i in (m[:2] if len(m) > 1 else (m[0], m[0])))
    first = [picks.index(m[0]) for m in members]
    steady = [picks.index(m[1]) if len(m) > 1 else picks.index(m[0]) + 1 for m in members]
    return {"kinds": kinds, "picks": picks, "first": first, "steady": steady}


def cut(model, plan: dict) -> None:
    """Keep only the copy's layers (``plan["picks"]``) in ``model``, in place: deep copies for repeated picks,
    the depth and every per-layer config list cut to match (the forward reads both: ``self.layers[:
    self.config.num_hidden_layers]``, ``self.config.layer_types[i]``)."""
    import torch

    hf = _base(model)
    config = hf.config
    owner, name = layer_owner(model)
    layers = getattr(owner, name)
    keys = per_layer_keys(config, len(layers))
    picked, used = [], set()
    for index in plan["picks"]:
        layer = layers[index]
        picked.append(copy.deepcopy(layer, memo={id(config): config}) if index in used else layer)
        used.add(index)
    setattr(owner, name, torch.nn.ModuleList(picked))
    for key in keys:
        values = getattr(config, key)
        setattr(config, key, type(values)(values[i] for i in plan["picks"]))
    config.num_hidden_layers = len(picked)


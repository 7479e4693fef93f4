"""Any HF causal LM: its ``ModelShape`` and exact parameter tensors from the model built on the meta device.

The families ``core.architecture`` writes out (``core.shape.FAMILIES``, and ``core.arch_qwen3_mixtral``'s qwen3,
qwen3_moe and mixtral) keep their closed forms. Every other
``model_type`` that ``AutoModelForCausalLM.from_config`` builds goes through here: ``generic_shape`` reads the
shape's fields from the HF config class (transformers ``AutoConfig.for_model``, so that the class defaults of
fields left out of config.json apply), and ``meta_param_tensors`` lists ``model.named_parameters()`` of the
full-depth model on ``torch.device("meta")``: no memory, exact names, order and element counts. Tied weights
appear once (``named_parameters(remove_duplicate=True)``); buffers (rotary ``inv_freq``, ...) are not
parameters and are left out, as DeepSpeed's ZeRO partitions parameters only (partition_parameters.py
``_convert_to_deepspeed_param`` runs over ``module.parameters``).

A family's quirks (MoE experts and routers, q/k norms, pre/post norms, latent attention) are whatever modules
the model registers; the component of a tensor is read from its name by ``COMPONENT_RULES``.

Both are kept on disk beside the traced profiles (``trace.cache.cache_dir() / "shapes"``), one file per config.json
and transformers version: reading them needs torch and transformers imported and the model built, about 10 s on a
two-core machine, which a second ``predict`` of the same model then skips.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from zeroest.estimator.core.shape import ModelShape
from zeroest.estimator.trace.cache import cache_dir, cache_key, read_versioned, write_atomically

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'zeroest[validate]'"
"""What makes traced families work: torch and transformers."""

COMPONENT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("lm_head", ("lm_head",)),
    ("norms", ("norm", "ln_", "layernorm")),
    ("position_embeddings", ("embed_positions", "wpe", "position_embeddings")),
    ("embeddings", ("embed", "wte")),
    ("attention", ("attn", "attention")),
    ("mlp", ("mlp", "experts", "moe", "feed_forward", "ffn", "gate", "router")),
)
"""(component, substrings): the first rule a module name of the parameter (its path, without ``.weight``)
matches decides; the norm rule reads the last module only, so that ``self_attn.q_norm`` is a norm. A tensor that
matches none belongs to ``mlp`` inside the decoder layers and to ``embeddings`` outside them."""


def component_of(name: str) -> str:
    """The component of the parameter called ``name`` (``model.layers.0.self_attn.q_norm.weight`` -> norms)."""
    modules = name.split(".")[:-1]
    path, last = ".".join(modules).lower(), (modules[-1].lower() if modules else "")
    for component, needles in COMPONENT_RULES:
        where = last if component == "norms" else path
        if any(needle in where for needle in needles):
            return component
    return "mlp" if any(part.isdigit() for part in modules) else "embeddings"


def _require_transformers(family: str, name: str):
    import importlib.util

    if any(importlib.util.find_spec(lib) is None for lib in ("torch", "transformers")):
        raise ValueError(f"config {name!r} has model_type {family!r}, which needs torch and transformers to read "
                         f"its parameters: {INSTALL_HINT}")


def hf_config_object(config: dict, name: str):
    """The transformers config object of a config.json dict; ValueError (one line) for an unknown model_type."""
    family = config["model_type"]
    _require_transformers(family, name)
    from transformers import AutoConfig

    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    try:
        cfg = AutoConfig.for_model(family, **kwargs)
    except (ValueError, KeyError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"config {name!r}: transformers cannot build model_type {family!r} ({first[:120]}): "
                         "is it a causal LM config, and is transformers recent enough?") from None
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(cfg), None)
    if model_class is None or not model_class.__name__.endswith("ForCausalLM"):  # e.g. bert's BertLMHeadModel
        raise ValueError(f"config {name!r} has model_type {family!r}, which has no decoder-only *ForCausalLM "
                         "in transformers: only causal LMs work")
    return cfg


def _attr(cfg, *names: str, default=None):
    for key in names:
        value = getattr(cfg, key, None)
        if value is not None:
            return value
    return default


SHAPE_CACHE_VERSION = 1
"""Bumped whenever what ``generic_shape`` or ``meta_param_tensors`` reads off the model changes."""


def _cache_path(config: dict) -> Path:
    from zeroest.estimator.trace.tracer import library_versions

    key = cache_key({"shapes": SHAPE_CACHE_VERSION, "config": config,
                     "transformers": library_versions()["transformers"]})
    return cache_dir() / "shapes" / f"{key}.json"


def _cached(config: dict) -> dict:
    """The cache entry of ``config`` ({} when there is none, or one of another version; a file that cannot be
    read is ignored with one warning and written again)."""
    path = _cache_path(config)
    try:
        return read_versioned(path, SHAPE_CACHE_VERSION) or {}
    except (OSError, ValueError) as err:
        log.warning(f"ignoring the model shape cache file {path} ({err}); reading the model again")
        return {}


def _remember(config: dict, **fields) -> None:
    """Add ``fields`` to the cache entry of ``config`` (``trace.cache.write_atomically``)."""
    write_atomically(_cache_path(config), {**_cached(config), **fields, "version": SHAPE_CACHE_VERSION},
                     "model shape")


def generic_shape(config: dict, name: str) -> ModelShape:
    """A ``ModelShape`` for a family without a closed form; ``extra["config"]`` keeps the config.json dict,
    which the tracer and ``meta_param_tensors`` build from. The scalar fields are the config class's values
    (its defaults where config.json leaves them out); MoE models report the dense ``intermediate_size``. Read
    from the shape cache where it holds the config (torch and transformers must still be installed: the trace
    needs them, and their versions key the cache)."""
    _require_transformers(config["model_type"], name)
    entry = _cached(config)
    if isinstance(entry.get("shape"), dict):
        try:
            return ModelShape(name=name, **entry["shape"],
                              extra={"config": dict(config), "hidden_act": str(entry.get("hidden_act", "silu"))})
        except TypeError as err:  # fields of another ModelShape: read the model again
            log.warning(f"ignoring the cached shape of {name!r} ({err}); reading the model again")
    shape = _read_shape(config, name)
    fields = {k: v for k, v in dataclasses.asdict(shape).items() if k not in ("name", "extra")}
    _remember(config, shape=fields, hidden_act=shape.extra["hidden_act"])
    return shape


def _read_shape(config: dict, name: str) -> ModelShape:
    cfg = hf_config_object(config, name)
    hidden = int(_attr(cfg, "hidden_size", "n_embd", "d_model"))
    heads = int(_attr(cfg, "num_attention_heads", "n_head", default=1))
    head_dim = int(_attr(cfg, "head_dim", default=hidden // max(heads, 1)))
    return ModelShape(
        name=name,
        family=config["model_type"],
        vocab_size=int(cfg.vocab_size),
        hidden_size=hidden,
        num_layers=int(_attr(cfg, "num_hidden_layers", "n_layer")),
        num_heads=heads,
        num_kv_heads=int(_attr(cfg, "num_key_value_heads", default=heads)),
        head_dim=head_dim,
        intermediate_size=int(_attr(cfg, "intermediate_size", "moe_intermediate_size", "ffn_dim", default=4 * hidden)),
        max_positions=int(_attr(cfg, "max_position_embeddings", "n_positions", default=2048)),
        gated_mlp=True,
        tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        norm="rmsnorm",
        positions="rotary",
        attention_bias=bool(getattr(cfg, "attention_bias", False)),
        extra={"config": dict(config), "hidden_act": str(_attr(cfg, "hidden_act", "hidden_activation",
                                                                default="silu"))},
    )


def meta_model(config: dict):
    """``AutoModelForCausalLM.from_config`` of the whole model on the meta device (fp32, eager attention)."""
    from zeroest.estimator.trace.model import build_model

    return build_model(config, "fp32", "eager", device="meta", num_layers=None)


def _linear_shapes(model) -> dict[str, tuple[int, int]]:
    """Weight name -> (out, in) of every ``torch.nn.Linear`` and transformers ``Conv1D`` (weight (in, out),
    ``nf`` outputs): the modules peft 0.21's ``all-linear`` selects (tuners_utils.py
    ``_maybe_include_all_linear_layers``: ``isinstance(module, (torch.nn.Linear, Conv1D))``)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            out[f"{name}.weight"] = (module.out_features, module.in_features)
        elif isinstance(module, Conv1D):
            out[f"{name}.weight"] = (module.nf, module.weight.shape[0])
    return out


def _output_weight(model) -> str | None:
    """The name of the output embedding's weight (``get_output_embeddings()``), which peft's ``all-linear``
    leaves out and whose component is ``lm_head`` whatever the family calls it."""
    head = model.get_output_embeddings()
    return next((f"{name}.weight" for name, module in model.named_modules() if module is head), None)


def meta_param_tensors(shape: ModelShape) -> list[tuple[str, int, str, tuple[int, int] | None]]:
    """(name, numel, component, the (out, in) of a Linear's weight or None) of every entry of
    ``named_parameters()`` of ``shape``'s model on meta; read from the shape cache where it holds them."""
    config = shape.extra["config"]
    cached = _cached(config).get("tensors")
    if isinstance(cached, list):
        return [(name, int(numel), component, tuple(linear) if linear else None)
                for name, numel, component, linear in cached]
    out = _read_tensors(shape)
    _remember(config, tensors=[list(t) for t in out])
    return out


def _read_tensors(shape: ModelShape) -> list[tuple[str, int, str, tuple[int, int] | None]]:
    start = time.perf_counter()
    model = meta_model(shape.extra["config"])
    linear, head = _linear_shapes(model), _output_weight(model)
    out = [(name, param.numel(), "lm_head" if name == head else component_of(name), linear.get(name))
           for name, param in model.named_parameters()]
    log.info(f"read {len(out)} parameter tensors of {shape.name} on meta in {time.perf_counter() - start:.2f} s")
    return out

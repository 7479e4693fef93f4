"""The HF model the tracer runs: built from a config.json dict, with checkpointing switched and layers found.

``build_model`` makes a ``*ForCausalLM`` from the config (``core.hf_config``) with ``TRACE_LAYERS`` decoder
layers, in the run's dtype, on the meta device by default (the tests and the CUDA check build it on real
devices too); ``set_checkpointing`` and ``decoder_layers`` hide the differences between transformers versions
and families.
"""

from __future__ import annotations

from zeroest.estimator.core.hf_config import layers_key

TRACE_LAYERS = 2
"""Decoder layers in the traced copy: layer 1 is the steady state, layer 0 also carries what layers share."""
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
"""The run's dtype as the name of the torch dtype."""
HF_ATTENTION = {"sdpa": "sdpa", "flash": "sdpa", "eager": "eager"}
"""HF ``attn_implementation`` built for each attention: flash is built as sdpa, the tracer forces the
flash-like kernel for it."""


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
        cfg[layers_key(family)] = num_layers
    hf = AutoConfig.for_model(family, **cfg)
    hf.use_cache = False
    impl = HF_ATTENTION[attn]
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf, dtype=getattr(torch, TORCH_DTYPES[dtype]),
                                                 attn_implementation=impl)
    model.config.use_cache = False
    _cast_params(model, getattr(torch, TORCH_DTYPES[dtype]))
    return model.train()


def _cast_params(model, dtype) -> None:
    """Every floating parameter in the training dtype, as DeepSpeed casts them (engine.py
    ``_cast_module_mixed_precision``: parameters only, buffers stay): a weight transformers keeps in fp32
    (``_keep_in_fp32_modules_strict``, e.g. a router's) trains in the run's dtype, and a module that upcasts it
    (``weight.type(torch.float32)``) makes an fp32 copy that the trace must see."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


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

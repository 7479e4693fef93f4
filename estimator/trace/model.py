"""The HF model the tracer runs: built from a config.json dict, with checkpointing switched and layers found.

``build_model`` makes a ``*ForCausalLM`` from the config (``core.hf_config``), at full depth or with
``num_layers`` decoder layers, in the run's dtype, on the meta device by default (the tests and the CUDA check
build it on real devices too); ``set_checkpointing``, ``layer_owner`` and ``decoder_layers`` hide the
differences between transformers versions and families.
"""

from __future__ import annotations

from zeroest.estimator.core.hf_config import layers_key

TRACE_LAYERS = 2
"""Decoder layers ``build_model`` keeps by default (tests and the CUDA check); the tracer builds every layer and
cuts the model to one copy of each kind of layer (``trace.kinds``)."""
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
        if isinstance(cfg.get("layer_types"), list):  # the config classes require one type per layer
            cfg["layer_types"] = cfg["layer_types"][:num_layers]
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


def layer_owner(model) -> tuple:
    """The module holding the decoder layers' ``ModuleList`` and its attribute name (``model.layers``,
    ``transformer.h`` or ``decoder.layers``), under a peft wrapper too."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    for base in (hf.base_model, getattr(hf, "model", None)):  # Llama4ForCausalLM: a base_model_prefix it lacks
        for path in ("layers", "h", "decoder.layers"):
            *parents, name = path.split(".")
            obj = base
            for part in parents:
                obj = getattr(obj, part, None)
            if obj is not None and getattr(obj, name, None) is not None:
                return obj, name
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}: is it a supported family?")


def decoder_layers(model) -> list:
    """The model's decoder layers, in order."""
    owner, name = layer_owner(model)
    return list(getattr(owner, name))


PEFT_DEPRECATION = r"`is_gradient_checkpointing` is deprecated"
"""The FutureWarning transformers 5.2x raises each time peft 0.21 wraps a model (peft_model.py
``PeftModel.__init__`` reads ``model.is_gradient_checkpointing``, deprecated for ``is_activation_checkpointing``)."""


def peft_model(wrap, model, config):
    """``wrap(model, config)`` (peft's ``get_peft_model``) without ``PEFT_DEPRECATION``: one library's note to the
    other, which the user can do nothing about, printed once per trace in the middle of ``predict``'s output."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_DEPRECATION, category=FutureWarning)
        return wrap(model, config)


def build_trained(config: dict, dtype: str, attn: str, adapters, *, grad_ckpt: bool,
                  frozen: frozenset[str] = frozenset(), device: str = "meta",
                  num_layers: int | None = TRACE_LAYERS, adapters_fp32: bool = False):
    """The model as the validator trains it with ``adapters`` (``core.adapters.Adapters``).

    In the validator's order: non-reentrant checkpointing switched on the HF model first (transformers
    modeling_utils.py ``_activation_checkpointing_enable`` then calls ``enable_input_require_grads``: a forward
    hook that makes the input embeddings' output require grad), the base weights named in ``frozen``
    ``requires_grad_(False)``, then peft's ``get_peft_model`` with ``LoraConfig(r, lora_alpha, lora_dropout,
    target_modules, modules_to_save, task_type="CAUSAL_LM")`` when LoRA is on (peft 0.21 peft_model.py
    ``PeftModel.__init__`` freezes every base weight, and calls ``enable_input_require_grads`` again when the
    model checkpoints).

    peft 0.21 upcasts bf16/fp16 adapters to fp32 (``PeftModel.__init__`` ``_cast_adapter_dtype``), and
    DeepSpeed 0.19.8 casts every parameter back to the run's dtype (runtime/engine.py
    ``_configure_distributed_model`` -> ``_cast_module_mixed_precision``): so are the adapters here, and
    ``lora.Linear.forward``'s ``_cast_input_dtype`` is a no-op. ``adapters_fp32`` keeps peft's fp32 adapters,
    as a model built under zero.Init keeps them (the engine skips its cast for it, and stage 3's
    ``_convert_to_zero_parameters`` moves the new parameters without one): each wrapped Linear then casts its
    input to fp32.
    """
    model = build_model(config, dtype, attn, device, num_layers)
    set_checkpointing(model, grad_ckpt)
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    if not adapters.lora:
        return model
    from peft import LoraConfig, get_peft_model

    targets = [t.strip() for t in adapters.lora_targets.split(",") if t.strip()]
    saved = [m.strip() for m in adapters.modules_to_save.split(",") if m.strip()] or None
    lora = LoraConfig(r=adapters.lora_rank, lora_alpha=adapters.lora_alpha or 8, lora_dropout=adapters.lora_dropout,
                      target_modules=targets[0] if targets == ["all-linear"] else targets, modules_to_save=saved,
                      task_type="CAUSAL_LM")
    model = peft_model(get_peft_model, model, lora).train()
    if adapters_fp32:
        return model
    import torch

    run_dtype = getattr(torch, TORCH_DTYPES[dtype])
    for param in model.parameters():
        if param.dtype != run_dtype:
            param.data = param.data.to(run_dtype)
    return model

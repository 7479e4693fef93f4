"""The setup's LoRA adapters and frozen weights applied to a real Hugging Face model (probes and workers).

``apply_adapters(model, adapters)`` does what a user's script does before ``deepspeed.initialize``:

* ``--freeze``: ``requires_grad = False`` on the base weights the patterns name (the names
  ``core.adapters.trainable_split`` lists as frozen for the model's shape);
* ``--lora-rank``: peft's ``get_peft_model(model, LoraConfig(r, lora_alpha, lora_dropout, target_modules,
  modules_to_save))``, which freezes the base model and adds the adapters (peft tuners/lora/model.py
  ``LoraModel._create_and_replace``). peft casts bf16/fp16 adapter weights to fp32 (``autocast_adapter_dtype``);
  DeepSpeed casts every parameter back to the training dtype in ``initialize`` (engine.py
  ``_cast_module_mixed_precision``), so the states are the same either way.

The caller then passes ``model.parameters()`` (frozen ones included, as accelerate does) to DeepSpeed.
"""

from __future__ import annotations

from typing import Any

from zeroest.estimator.core.adapters import ALL_LINEAR, Adapters, trainable_split
from zeroest.estimator.core.architecture import shape_from_config


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def apply_adapters(model: Any, adapters: Adapters) -> Any:
    """The model as trained with ``adapters``: the same module with frozen weights, or a ``PeftModel``."""
    if adapters.full:
        return model
    if adapters.freeze:
        shape = shape_from_config(model.config.to_dict(), getattr(model.config, "name_or_path", "") or "model")
        frozen = {t.name for t in trainable_split(shape, Adapters(freeze=adapters.freeze)).frozen}
        for name, param in model.named_parameters():
            if name in frozen:
                param.requires_grad_(False)
    if not adapters.lora:
        return model
    import peft

    targets = adapters.lora_targets
    config = peft.LoraConfig(
        r=adapters.lora_rank,
        lora_alpha=adapters.lora_alpha or 8,
        lora_dropout=adapters.lora_dropout,
        target_modules=targets if targets == ALL_LINEAR else _names(targets),
        modules_to_save=_names(adapters.modules_to_save) or None,
    )
    return peft.get_peft_model(model, config)


def trainable_numel(model: Any) -> int:
    """Elements of the parameters that train (``requires_grad``), as peft's ``print_trainable_parameters``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

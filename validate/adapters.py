"""The setup's adapters applied to the real model: peft LoRA, ``modules_to_save`` and frozen base weights.

What a user's LoRA job does before ``deepspeed.initialize``: build the HF model, enable (non-reentrant) gradient
checkpointing on it, then ``peft.get_peft_model(model, LoraConfig(...))`` (peft 0.21 ``mapping_func.py``), which
freezes every base weight (``LoraModel._mark_only_adapters_as_trainable``, bias "none") and adds ``lora_A``/
``lora_B`` beside each targeted Linear. ``--freeze`` patterns are applied to the base model first, as
``requires_grad_(False)`` on the parameters ``core.adapters.trainable_split`` names frozen.

``parameter_groups`` hands DeepSpeed the trainable parameters as one list or in the two groups a Trainer makes.

The counts of the wrapped model are recorded beside the measurement and must equal the estimator's
(``trainable_split``): a run whose model is not the one the estimate assumed fails here instead of producing a row.
"""

from __future__ import annotations


def check_measurable(adapters, where: str) -> None:
    """ValueError for adapters the worker cannot apply as the estimate assumes them: a QLoRA base (``base_quant``)
    is built from its config in 16 bits here (4-bit loading goes through ``from_pretrained`` with trained
    weights), so its row would measure a 16-bit LoRA run against a 4-bit prediction."""
    if adapters.base_quant != "none":
        raise ValueError(f"{where}: base_quant {adapters.base_quant} (QLoRA) cannot be validated: the worker builds "
                         "the base from its config in 16 bits (4-bit loading needs trained weights through "
                         "from_pretrained); drop base_quant from the entry, or estimate it with predict")


def expected_adapters(spec: dict):
    """(the setup's ``core.adapters.Adapters``, its ``trainable_split``): the estimator's view of the spec."""
    from zeroest.estimator.configs.flat import setup_from_dict
    from zeroest.estimator.core.adapters import trainable_split
    from zeroest.estimator.core.architecture import shape_from_config

    shape = shape_from_config(dict(spec["model_config"]), str(spec["setup"]["model"]))
    setup = setup_from_dict(spec["setup"], model=shape, where="spec")
    return setup.adapters, trainable_split(setup.model, setup.adapters)


def _counts(model) -> dict:
    seen: set[int] = set()
    trainable = frozen = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = int(getattr(p, "ds_numel", 0) or p.numel())  # under zero.Init a parameter's own numel is 0
        if p.requires_grad:
            trainable += n
        else:
            frozen += n
    return {"trainable_params": trainable, "frozen_params": frozen}


def apply_adapters(model, spec: dict):
    """(model, counts): the spec's freeze patterns and LoRA applied to ``model``; ``model`` unchanged and ``{}``
    for a full fine-tune. Raises RuntimeError when the counts differ from the estimator's."""
    from zeroest.estimator.core.adapters import ALL_LINEAR, name_list

    adapters, split = expected_adapters(spec)
    if adapters.full:
        return model, {}
    if not adapters.lora:
        if name_list(adapters.modules_to_save):
            raise RuntimeError("modules_to_save without a LoRA rank is not a peft setup: add lora_rank")
        frozen = {t.name for t in split.frozen}
        for name, param in model.named_parameters():
            if name in frozen:
                param.requires_grad_(False)
    else:
        import peft
        from zeroest.estimator.trace.model import peft_model

        targets = name_list(adapters.lora_targets)
        config = peft.LoraConfig(
            r=adapters.lora_rank,
            lora_alpha=adapters.lora_alpha or 8,
            lora_dropout=float(adapters.lora_dropout),
            target_modules=ALL_LINEAR if targets == (ALL_LINEAR,) else list(targets),
            modules_to_save=list(name_list(adapters.modules_to_save)) or None,
            task_type="CAUSAL_LM",
        )
        model = peft_model(peft.get_peft_model, model, config)
    counts = _counts(model)
    want = {"trainable_params": split.trainable_numel, "frozen_params": split.frozen_numel}
    if counts != want:
        raise RuntimeError(f"the wrapped model has {counts} but the estimator assumed {want}: the adapters differ")
    return model, counts


def parameter_groups(model, groups: int) -> list:
    """The trainable parameters as ``deepspeed.initialize``'s ``model_parameters``: one list (``groups`` 1), or the
    HF Trainer's two groups, weight decay and none (transformers trainer.py ``create_optimizer`` with
    ``get_decay_parameter_names``: no decay for biases and norm weights)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if int(groups) <= 1:
        return [p for _, p in named]
    if int(groups) > 2:
        raise ValueError(f"param_groups {groups}: the validator builds one group or the Trainer's two")
    try:
        from transformers import Trainer

        decay = set(Trainer.get_decay_parameter_names(None, model))
    except Exception:  # noqa: BLE001 - an older transformers: the same rule by name
        from zeroest.estimator.core.vocab import weight_decays

        decay = {name for name, _ in named if weight_decays(name)}
    return [{"params": [p for name, p in named if name in decay], "weight_decay": 0.01},
            {"params": [p for name, p in named if name not in decay], "weight_decay": 0.0}]

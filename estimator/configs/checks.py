"""What a config file decides that a flag also said, and what a file sets that zeroest does not model.

Flags and files: a flag given together with a ds_config / accelerate config that decides the same thing must agree
with the file, or the request is refused with the flag, the file and its key named. This is the HF Trainer's own
rule (transformers/integrations/deepspeed.py ``HfTrainerDeepSpeedConfig.fill_match`` stops on a
``TrainingArguments`` value that mismatches a ds_config value); where the file says "auto" or leaves the value
open to the trainer's arguments, the flag fills it.
"""

from __future__ import annotations

import json
from enum import Enum

from zeroest.estimator.configs.files import unknown_key_warnings
from zeroest.estimator.configs.flat import axes, setup_to_dict
from zeroest.estimator.configs.keys import DS_KEYS, OFFLOAD_KEYS, ZERO_KEYS
from zeroest.estimator.core.setup import TrainingSetup
from zeroest.estimator.core.vocab import ZERO_KNOBS

FILE_KEYS: dict[str, str] = {
    "gpus_per_node": "num_processes / num_machines",
    "nodes": "num_machines",
    "micro_batch": "train_micro_batch_size_per_gpu",
    "grad_accum": "gradient_accumulation_steps",
    "dtype": "bf16.enabled / fp16.enabled",
    "optimizer": "optimizer.type",
    "optimizer_impl": "optimizer.type / optimizer.params.torch_adam",
    "stage": "zero_optimization.stage",
    "offload_optimizer": "zero_optimization.offload_optimizer.device",
    "offload_params": "zero_optimization.offload_param.device",
    "pin_memory": "zero_optimization.offload_*.pin_memory",
    "zero_init": "zero3_init_flag",
    **{knob.name: f"zero_optimization.{knob.ds_key}" for knob in ZERO_KNOBS},
}
"""Where in the files each flat setup key is decided (named in conflict errors)."""


def _plain(value):
    return value.value if isinstance(value, Enum) else value


def _flag(key: str) -> str:
    for name, _, f in axes():
        if name == key:
            return f.metadata["flag"].split("/")[0].split(" ")[0]
    return f"--{key.replace('_', '-')}"


def flag_conflicts(setup: TrainingSetup, flags: dict, where: str) -> list[str]:
    """One line per typed flag whose value the files' setup does not have: the flag, the file's value and key,
    and the two ways out."""
    flat = setup_to_dict(setup)
    lines = []
    for key, value in flags.items():
        if key not in flat or _plain(value) == flat[key]:
            continue
        if isinstance(value, bool) and not value:
            shown = _flag(key).replace("--", "--no-", 1)
        else:
            shown = _flag(key) if isinstance(value, bool) else f"{_flag(key)} {_plain(value)}"
        lines.append(f"{shown} contradicts {where}, where {FILE_KEYS.get(key, key)} gives {flat[key]}: drop the "
                     "flag, or change the file (a value of \"auto\" there takes the flag)")
    return lines


UNMODELLED: dict[str, str] = {
    "zero_optimization.zero_hpz_partition_size": "ZeRO++ hierarchical partitioning (a secondary copy of the "
    "16-bit weights per node)",
    "zero_optimization.zero_quantized_weights": "ZeRO++ quantized weight all-gather",
    "zero_optimization.zero_quantized_nontrainable_weights": "ZeRO++ quantized frozen weights",
    "zero_optimization.zero_quantized_gradients": "ZeRO++ quantized gradient reduce-scatter",
    "zero_optimization.mics_shard_size": "MiCS sharding",
    "mics_shard_size": "MiCS sharding",
    "zero_quantized_weights": "ZeRO++ quantized weight all-gather",
    "activation_checkpointing.partition_activations": "DeepSpeed's activation partitioning",
    "activation_checkpointing.cpu_checkpointing": "checkpointed activations kept on the CPU",
    "activation_checkpointing.contiguous_memory_optimization": "contiguous checkpoint buffers",
    "data_types.grad_accum_dtype": "a gradient accumulation dtype other than the training one",
    "communication_data_type": "a communication dtype other than the training one",
    "sparse_gradients": "sparse embedding gradients",
    "sequence_parallel_size": "sequence parallelism",
    "pipeline": "pipeline parallelism",
    "compile": "torch.compile of the engine",
    "amp": "torch AMP instead of DeepSpeed's bf16/fp16",
    "torch_autocast": "torch autocast instead of DeepSpeed's bf16/fp16",
    "zero_optimization.offload_optimizer.ratio": "partial optimizer offload (ZeRO-Offload++)",
}
"""ds_config keys DeepSpeed acts on that change memory and that the estimate does not model, with what they do."""

def _off(value) -> bool:
    """A value that leaves DeepSpeed's default behaviour: unset, false, "auto", or a partition/shard size or ratio
    of 0 or 1."""
    if value is None or value is False or value in ({}, []):
        return True
    if isinstance(value, str):
        return value.lower() in ("none", "auto", "false")
    return not isinstance(value, bool) and isinstance(value, int | float) and value in (0, 1)


def _value(config: dict, dotted: str):
    node = config
    for name in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(name)
    if isinstance(node, dict) and "enabled" in node:
        return node["enabled"]
    return node


def unmodelled_warnings(config: dict, where: str) -> list[str]:
    """One warning per ``UNMODELLED`` key that ``config`` turns on: what it does, that the estimate leaves it out."""
    lines = []
    for dotted, what in UNMODELLED.items():
        value = _value(config, dotted)
        if _off(value):
            continue
        lines.append(f"{where}: {dotted} = {value!r} ({what}) is not modelled; the estimate ignores it, "
                     "so measured memory may differ")
    return lines


SECTIONS: dict[str, tuple[bool, str]] = {
    "zero_optimization": (False, '{"stage": 2}'),
    "zero_optimization.offload_optimizer": (True, '{"device": "cpu"}'),
    "zero_optimization.offload_param": (True, '{"device": "cpu"}'),
    "optimizer": (False, '{"type": "AdamW", "params": {"lr": 1e-5}}'),
    "optimizer.params": (False, '{"lr": 1e-5}'),
    "scheduler": (False, '{"type": "WarmupLR", "params": {}}'),
    "fp16": (False, '{"enabled": true}'),
    "bf16": (False, '{"enabled": true}'),
    "bfloat16": (False, '{"enabled": true}'),
}
"""ds_config sections DeepSpeed builds a config object from (runtime/config.py, ``zero/config.py``
``DeepSpeedZeroConfig``, ``precision_config.py``): whether ``null`` is allowed (an ``Optional`` field), and an
example. Anything but a JSON object there stops ``deepspeed.initialize``."""


def check_sections(config: dict, where: str) -> None:
    """ValueError naming the first section of ``SECTIONS`` that ``config`` holds as something other than a JSON
    object (a list, a string, ``true``), instead of the section being misread or dropped."""
    for dotted, (nullable, example) in SECTIONS.items():
        *parents, key = dotted.split(".")
        node = config
        for name in parents:
            node = node.get(name) if isinstance(node, dict) else None
        if not isinstance(node, dict) or key not in node:
            continue
        value = node[key]
        if isinstance(value, dict) or (value is None and nullable):
            continue
        raise ValueError(f"{where}: {dotted} must be a JSON object such as {example}, got {json.dumps(value)} "
                         "(DeepSpeed stops at init); fix the file")


def ds_key_warnings(config: dict, where: str) -> list[str]:
    """One warning per ds_config key that DeepSpeed does not know (top level, ``zero_optimization`` and its
    offload sections), with the nearest known key."""
    warnings = unknown_key_warnings(config, DS_KEYS, where, "DeepSpeed ignores unknown top-level keys")
    zero = config.get("zero_optimization")
    if isinstance(zero, dict):
        warnings += unknown_key_warnings(
            zero, ZERO_KEYS, f"{where} zero_optimization", "DeepSpeedZeroConfig rejects it at init"
        )
        for name in ("offload_optimizer", "offload_param"):
            if isinstance(zero.get(name), dict):
                warnings += unknown_key_warnings(zero[name], OFFLOAD_KEYS[name], f"{where} zero_optimization.{name}",
                                                 "DeepSpeed rejects it at init")
    return warnings

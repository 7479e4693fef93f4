"""Read a real ds_config.json (and an accelerate config YAML) into the ``TrainingSetup`` they would train.

``base`` stands in for what the files leave open, the way the HF Trainer's ``TrainingArguments`` do: the
model, world size, micro-batch (``per_device_train_batch_size``), accumulation, precision, sequence,
checkpointing. "auto" values are resolved as transformers/integrations/deepspeed.py
``HfTrainerDeepSpeedConfig`` does (``trainer_config_process`` and ``trainer_config_finalize``), accelerate's
``deepspeed_config`` section as accelerate/utils/dataclasses.py ``DeepSpeedPlugin.__post_init__`` does.
Conflicts the tools would stop on, and keys neither knows, come back as warnings (one line each) next to the
setup.
"""

from __future__ import annotations

import json
import logging
from dataclasses import fields
from pathlib import Path

from zeroest.estimator.configs.accelerate import accelerate_ds_config, accelerate_world, read_accelerate
from zeroest.estimator.configs.checks import check_sections, ds_key_warnings, unmodelled_warnings
from zeroest.estimator.configs.ds_write import ZERO_TESTED, muon_needs_no_reduce_scatter
from zeroest.estimator.configs.files import ds_bool, read_json, whole_number
from zeroest.estimator.core.adapters import Adapters
from zeroest.estimator.core.setup import Optimizer, TrainingSetup, Workload, ZeroConfig
from zeroest.estimator.core.vocab import (
    EIGHT_BIT,
    ZERO_KNOBS,
    Builder,
    OptimizerImpl,
    default_optimizer_impl,
    hf_trainer_auto,
    loop_default,
    param_groups_default,
    zero_init_default,
)

log = logging.getLogger(__name__)

ADAPTER_FIELDS = {f.metadata["key"] or f.name: f for f in fields(Adapters) if "flag" in f.metadata}
"""The adapters' flat keys (``core.adapters.Adapters``), by key."""
ADAPTER_KEYS: tuple[str, ...] = tuple(ADAPTER_FIELDS)

BASE_KEYS: tuple[str, ...] = (
    "model",
    "gpus_per_node",
    "nodes",
    "micro_batch",
    "grad_accum",
    "seq_len",
    "grad_ckpt",
    "attn",
    "activations",
    "dtype",
    "optimizer",
    "max_grad_norm",
    "zero_init",
    "loop",
    "param_groups",
    *ADAPTER_KEYS,
)
"""Keys ``base`` may hold; ``model`` (a ModelShape) is required. No config file holds the adapters (peft's
LoraConfig is the script's): they come from the flags alone."""


def _node(config: dict, dotted: str) -> tuple[dict | None, str]:
    """(the dict holding the last key, that key): ``HfDeepSpeedConfig.find_config_node``."""
    *parents, key = dotted.split(".")
    for name in parents:
        config = config.get(name)
        if not isinstance(config, dict):
            return None, key
    return config, key


def _fill(config: dict, dotted: str, value) -> None:
    """Replace an "auto" value (``HfTrainerDeepSpeedConfig.fill_match`` / ``fill_only``)."""
    node, key = _node(config, dotted)
    if node is not None and node.get(key) == "auto":
        node[key] = value


def _fixed(value, default: int) -> int:
    """A batch size the file fixes (a number), else ``default``."""
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else default


def resolve_auto(
    config: dict,
    *,
    hidden_size: int,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    dtype: str,
    max_grad_norm: float = 1.0,
) -> dict:
    """A copy of ``config`` with the "auto" values zeroest models filled in as the HF Trainer fills them.

    ``trainer_config_process``: ``train_micro_batch_size_per_gpu`` = per-device batch,
    ``gradient_accumulation_steps`` = accumulation, ``train_batch_size`` = world x micro x accumulation (from
    the arguments, not from the file), ``gradient_clipping`` = max_grad_norm, ``fp16.enabled`` /
    ``bf16.enabled`` from the precision. ``trainer_config_finalize``: ``reduce_bucket_size`` = h^2, and at
    stage 3 ``stage3_prefetch_bucket_size`` = int(0.9 h^2) and ``stage3_param_persistence_threshold`` = 10 h,
    h the model's hidden size.
    """
    out = json.loads(json.dumps(config))
    zero = out.get("zero_optimization")
    stage = zero.get("stage") if isinstance(zero, dict) else None
    # The Trainer's train_batch_size is world x its own micro x accumulation, which must match the file's fixed
    # values (fill_match), so a file that fixes them fixes the product too.
    micro_batch = _fixed(out.get("train_micro_batch_size_per_gpu"), micro_batch)
    grad_accum = _fixed(out.get("gradient_accumulation_steps"), grad_accum)
    values = hf_trainer_auto(hidden_size=hidden_size, micro_batch=micro_batch, grad_accum=grad_accum,
                             world_size=world_size, dtype=dtype, stage=stage, max_grad_norm=max_grad_norm)
    for dotted, value in values.items():
        _fill(out, dotted, value)
    return out


def _batch(config: dict, world: int, base: dict, where: str) -> tuple[int, int, list[str]]:
    """(micro-batch, accumulation, warnings) as runtime/config.py ``_set_batch_related_parameters``."""
    tbs, mb, ga = (
        config.get(k)
        for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    )
    tbs, mb, ga = (
        None if v is None else whole_number(v, k, where)
        for v, k in (
            (tbs, "train_batch_size"),
            (mb, "train_micro_batch_size_per_gpu"),
            (ga, "gradient_accumulation_steps"),
        )
    )
    warnings = []
    if mb is None and ga is not None and tbs is not None:
        mb = tbs // (world * ga)
    elif ga is None and mb is not None and tbs is not None:
        ga = tbs // (world * mb)
    elif mb is None and tbs is not None:
        mb, ga = tbs // world, 1
    if mb is None:
        mb = base.get("micro_batch", 1)
        warnings.append(
            f"{where}: sets neither train_batch_size nor train_micro_batch_size_per_gpu (DeepSpeed stops "
            f"at init); using micro-batch {mb}"
        )
    ga = 1 if ga is None else ga
    if tbs is not None and tbs != mb * ga * world:
        warnings.append(
            f"{where}: train_batch_size {tbs} != train_micro_batch_size_per_gpu {mb} x "
            f"gradient_accumulation_steps {ga} x world size {world} = {mb * ga * world}; DeepSpeed stops "
            f"at init (runtime/config.py _batch_assertion); using micro-batch {mb}, accumulation {ga}"
        )
    if mb < 1 or ga < 1:
        raise ValueError(
            f"{where}: micro-batch {mb} and accumulation {ga} must be 1 or more; fix the batch sizes"
        )
    return mb, ga, warnings


def _enabled(config: dict, name: str, where: str) -> bool:
    section = config.get(name)
    value = section.get("enabled", False) if isinstance(section, dict) else False
    return value != "auto" and ds_bool(value, f"{name}.enabled", where)


def _precision(config: dict, where: str) -> str:
    fp16 = _enabled(config, "fp16", where)
    bf16 = _enabled(config, "bf16", where) or _enabled(config, "bfloat16", where)
    if fp16 and bf16:
        raise ValueError(f"{where}: enables both fp16 and bf16; DeepSpeed accepts one, disable the other")
    return "fp16" if fp16 else "bf16" if bf16 else "fp32"


def _offload_device(zero: dict, name: str, legacy: str, where: str = "the ds_config") -> tuple[str, bool]:
    section = zero.get(name)
    if isinstance(section, dict):
        device = str(section.get("device") or "none")
        if device not in ("none", "cpu", "nvme"):
            raise ValueError(f"{where}: zero_optimization.{name}.device is {section.get('device')!r}; DeepSpeed "
                             "takes none, cpu or nvme (\"auto\" is not filled by any trainer): set one of them")
        return device, ds_bool(section.get("pin_memory", False), f"zero_optimization.{name}.pin_memory", where)
    if ds_bool(zero.get(legacy, False), f"zero_optimization.{legacy}", where):
        return "cpu", ds_bool(zero.get("cpu_offload_use_pin_memory", False), "cpu_offload_use_pin_memory", where)
    return "none", False


def has_auto(config) -> bool:
    """Whether any value of the ds_config is "auto": the file is written for the HF Trainer, which fills them."""
    if isinstance(config, dict):
        return any(has_auto(value) for value in config.values())
    if isinstance(config, list):
        return any(has_auto(value) for value in config)
    return config == "auto"


def builder_of(raw: dict, acc: dict | None, where: str = "the accelerate config") -> tuple[Builder, bool | None]:
    """Who builds the model, and accelerate's ``zero3_init_flag`` if set (``vocab.zero_init_default``)."""
    if acc is not None:
        flag = (acc.get("deepspeed_config") or {}).get("zero3_init_flag")
        return Builder.ACCELERATE, None if flag is None else ds_bool(
            flag, "deepspeed_config.zero3_init_flag", where, "accelerate's str_to_bool refuses it")
    return (Builder.HF_TRAINER if has_auto(raw) else Builder.SCRIPT), None


def _stage(value, where: str) -> int:
    stage = whole_number(value, "zero_optimization.stage", where)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"{where}: zero_optimization.stage is {value!r}; DeepSpeed's stages are 0, 1, 2 and 3: "
                         "set one of them")
    return stage


def _zero(config: dict, where: str, zero_init: bool) -> ZeroConfig:
    zero = config.get("zero_optimization") or {}
    opt_dev, opt_pin = _offload_device(zero, "offload_optimizer", "cpu_offload", where)
    par_dev, par_pin = _offload_device(zero, "offload_param", "cpu_offload_param", where)
    knobs = {}
    for knob in ZERO_KNOBS:
        value = zero.get(knob.ds_key)
        if value in (None, "auto"):
            continue
        what = f"zero_optimization.{knob.ds_key}"
        knobs[knob.name] = ds_bool(value, what, where) if knob.kind is bool else whole_number(value, what, where, 0)
    pinned = [pin for dev, pin in ((opt_dev, opt_pin), (par_dev, par_pin)) if dev != "none"]
    stage = _stage(zero.get("stage", 0), where)
    return ZeroConfig(
        stage=stage,
        zero_init=zero_init,
        offload_optimizer=opt_dev,
        offload_params=par_dev,
        pin_memory=all(pinned) if pinned else True,
        **knobs,
    )


_DS_TYPES = {"adam": "adam", "adamw": "adamw", "fusedadam": "adam", "cpuadam": "adam", "lion": "lion", "muon": "muon"}
"""ds_config optimizer types DeepSpeed builds itself, lower-cased (config.py ``DEEPSPEED_OPTIMIZERS`` is matched
case-insensitively)."""
_TORCH_TYPES = {"SGD": "sgd", "Adafactor": "adafactor"}
"""Types DeepSpeed takes from ``torch.optim`` by exact name (engine.py ``_configure_basic_optimizer``:
``getattr(torch.optim, self.optimizer_name())``)."""
_CLIENT_TYPES = {"adamw8bit": "adamw-8bit", "pagedadamw8bit": "paged-adamw-8bit"}


def _optimizer_type(section: dict, warnings: list[str], where: str) -> str:
    """Our name for ``optimizer.type``; ValueError where DeepSpeed would fail to build it."""
    raw = str(section.get("type", ""))
    kind = raw.lower().replace("_", "")
    if kind in _DS_TYPES:
        return _DS_TYPES[kind]
    if raw in _TORCH_TYPES:
        return _TORCH_TYPES[raw]
    exact = {name.lower(): name for name in _TORCH_TYPES}
    if kind in exact:
        raise ValueError(f"{where}: optimizer type {raw!r}: DeepSpeed looks up torch.optim.{raw} by exact name and "
                         f"fails; write \"{exact[kind]}\"")
    if kind in _CLIENT_TYPES:
        raise ValueError(f"{where}: optimizer type {raw!r} is bitsandbytes', not DeepSpeed's: drop the optimizer "
                         "section, pass the optimizer to deepspeed.initialize(optimizer=...) with "
                         f"zero_allow_untested_optimizer true, and give --optimizer {_CLIENT_TYPES[kind]}")
    warnings.append(f"{where}: optimizer type {raw!r} is not modelled; estimated as AdamW")
    return "adamw"


def _optimizer(config: dict, zero: ZeroConfig, base: dict, warnings: list[str], where: str,
               builder: Builder) -> Optimizer:
    section = config.get("optimizer")
    offload = zero.offload_optimizer != "none"
    groups = base.get("param_groups") or param_groups_default(builder, isinstance(section, dict))
    if not isinstance(section, dict):
        name = base.get("optimizer", "adamw")
        impl = OptimizerImpl.CPU if offload else OptimizerImpl.BNB if name in EIGHT_BIT else OptimizerImpl.TORCH
        warnings.append(
            f"{where}: no optimizer section: the training script's own optimizer runs (the HF Trainer's "
            f"torch {name}); estimated as {name} ({impl.value}), --optimizer changes it"
        )  # no ZeRO check: the HF Trainer sets zero_allow_untested_optimizer for its own optimizer
        return Optimizer(name=name, impl=impl, param_groups=groups)
    name = _optimizer_type(section, warnings, where)
    _check_untested(config, zero, name, where)
    params = section.get("params") or {}
    if name == "sgd":
        return Optimizer(name="sgd-momentum" if params.get("momentum", 0) else "sgd", param_groups=groups)
    torch_adam = name in ("adam", "adamw", "muon") and ds_bool(params.get("torch_adam", False),
                                                                "optimizer.params.torch_adam", where)
    return Optimizer(name=name, impl=OptimizerImpl.TORCH if torch_adam and not offload else
                     default_optimizer_impl(name, zero.offload_optimizer), param_groups=groups)


def _check_untested(config: dict, zero: ZeroConfig, name: str, where: str) -> None:
    """ValueError where ``deepspeed.initialize`` asserts: ZeRO with an optimizer it does not list as tested
    (runtime/zero/utils.py ``is_zero_supported_optimizer``) needs ``zero_allow_untested_optimizer: true``."""
    if zero.stage >= 1 and name not in ZERO_TESTED and not config.get("zero_allow_untested_optimizer", False):
        raise ValueError(f"{where}: ZeRO stage {int(zero.stage)} with {name} needs "
                         "\"zero_allow_untested_optimizer\": true (deepspeed.initialize asserts otherwise); add it")
    scatter = (config.get("zero_optimization") or {}).get("reduce_scatter", True)
    if muon_needs_no_reduce_scatter(int(zero.stage), name) and scatter is not False:
        raise ValueError(f"{where}: ZeRO-3 refuses Muon with reduce_scatter on (its default): set "
                         "zero_optimization.reduce_scatter to false")


def setup_from_configs(
    ds_config_path: str | Path | None, accelerate_path: str | Path | None, base: dict
) -> tuple[TrainingSetup, list[str]]:
    """The setup a ds_config.json and/or accelerate config would train, and warnings (conflicts, unknown
    keys).

    ``base`` holds ``BASE_KEYS`` (``model`` a ModelShape is required): what the HF Trainer's arguments
    would give. Values the files set win over ``base``; "auto" takes ``base``'s. The loop is ``base``'s when
    given, else the files' builder's (``vocab.loop_default``: trainer for "auto" values, custom otherwise).
    """
    unknown = set(base) - set(BASE_KEYS)
    if unknown or "model" not in base:
        raise ValueError(f"base needs 'model' and only {', '.join(BASE_KEYS)}; got {sorted(base)}")
    if ds_config_path is None and accelerate_path is None:
        raise ValueError(
            "give a DeepSpeed config (--ds-config FILE) or an accelerate config (--accelerate-config)"
        )
    warnings: list[str] = []
    acc = None
    ds_path = Path(ds_config_path) if ds_config_path is not None else None
    if accelerate_path is not None:
        acc, ds_path = read_accelerate(Path(accelerate_path), ds_path, warnings)
    where = str(ds_path) if ds_path is not None else str(accelerate_path)
    if ds_path is not None:
        raw = read_json(ds_path)
        check_sections(raw, where)
        warnings += ds_key_warnings(raw, where) + unmodelled_warnings(raw, where)
    else:
        raw = accelerate_ds_config(acc, base)
    parallel = accelerate_world(acc, base, warnings, str(accelerate_path or where))
    dtype = base.get("dtype", "bf16")
    mp = (acc or {}).get("mixed_precision")
    if mp == "fp8":  # accelerate's DeepSpeedPlugin.set_mixed_precision enables bf16 for it
        warnings.append(f"{accelerate_path}: mixed_precision fp8 runs DeepSpeed in bf16 (DeepSpeedPlugin."
                        "set_mixed_precision); estimated as bf16, the fp8 matmuls' own buffers are not modelled")
        mp = "bf16"
    if mp in ("fp16", "bf16", "no"):
        file_dtype = _precision(raw, where)
        other = {"fp16": "bf16", "bf16": "fp16"}.get(mp)
        if ds_path is not None and other and _enabled(raw, other, where):
            warnings.append(
                f"{accelerate_path}: mixed_precision {mp} but {where} enables {other} (accelerate stops: "
                f"DeepSpeedPlugin.set_mixed_precision); estimating {file_dtype}"
            )
        dtype = {"no": "fp32"}.get(mp, mp)
        if mp in ("fp16", "bf16") and mp not in raw:
            raw[mp] = {"enabled": True}  # DeepSpeedPlugin.set_mixed_precision adds the section
    zero_stage = (raw.get("zero_optimization") or {}).get("stage")
    if zero_stage == "auto" and acc is not None:
        raw.setdefault("zero_optimization", {})["stage"] = (acc.get("deepspeed_config") or {}).get(
            "zero_stage", 2
        )
    resolved = resolve_auto(
        raw,
        hidden_size=base["model"].hidden_size,
        micro_batch=base.get("micro_batch", 1),
        grad_accum=base.get("grad_accum", 1),
        world_size=parallel.world_size,
        dtype=dtype,
        max_grad_norm=base.get("max_grad_norm", 1.0),
    )
    mb, ga, batch_warnings = _batch(resolved, parallel.world_size, base, where)
    warnings += batch_warnings
    dtype = _precision(resolved, where)
    if dtype == "fp32" and not any(k in resolved for k in ("fp16", "bf16", "bfloat16")):
        warnings.append(f"{where}: enables neither bf16 nor fp16, so DeepSpeed trains in fp32")
    builder, zero3_flag = builder_of(raw, acc, str(accelerate_path))
    stage = _stage((resolved.get("zero_optimization") or {}).get("stage", 0), where)
    zero_init = base["zero_init"] if base.get("zero_init") is not None else zero_init_default(
        stage, builder, zero3_flag)
    zero = _zero(resolved, where, zero_init)
    optimizer = _optimizer(resolved, zero, base, warnings, where, builder)
    workload = Workload(
        micro_batch=mb,
        grad_accum=ga,
        seq_len=base.get("seq_len", 2048),
        grad_ckpt=base.get("grad_ckpt", False),
        attn=base.get("attn", "sdpa"),
        activations=base.get("activations", "auto"),
        loop=base["loop"] if base.get("loop") is not None else loop_default(builder),
    )
    adapters = Adapters(**{f.name: base[key] for key, f in ADAPTER_FIELDS.items() if base.get(key) is not None})
    setup = TrainingSetup(model=base["model"], parallel=parallel, dtype=dtype, optimizer=optimizer, zero=zero,
                          workload=workload, adapters=adapters)
    for line in warnings:
        log.debug(line)
    return setup, warnings

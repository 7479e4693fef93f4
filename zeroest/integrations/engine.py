"""The ``TrainingSetup`` of a live DeepSpeed job, read off its engine, its model and the first batch.

Where each value comes from (DeepSpeed 0.19, deepspeed/runtime/engine.py ``DeepSpeedEngine``):

* ZeRO stage and knobs: ``zero_optimization_stage()``, ``zero_overlap_comm()`` (the dynamic default resolved),
  ``zero_contiguous_gradients()``, ``zero_reduce_bucket_size()``, ``zero_allgather_bucket_size()``,
  ``zero_prefetch_bucket_size()``, ``zero_max_live_parameters()``, ``zero_param_persistence_threshold()``,
  ``zero_sub_group_size()``; offload from ``zero_offload_optimizer()`` / ``zero_offload_param()`` (their
  ``device`` and ``pin_memory``);
* precision: ``bfloat16_enabled()`` / ``fp16_enabled()``, else fp32;
* accumulation: ``gradient_accumulation_steps()``; the micro-batch and sequence length are the first forward's
  ``input_ids`` shape (``train_micro_batch_size_per_gpu()`` is checked against it);
* the optimizer: the class of ``basic_optimizer`` (``_configure_basic_optimizer`` builds FusedAdam,
  DeepSpeedCPUAdam, FusedLion, DeepSpeedCPULion, MuonWithAuxAdam or ``torch.optim``'s; a client optimizer, such as
  bitsandbytes' AdamW8bit, is kept as given);
* the model: ``engine.module.config`` (HF config, to ``core.architecture.shape_from_config``), gradient
  checkpointing from ``is_gradient_checkpointing`` (transformers modeling_utils.py), attention from
  ``config._attn_implementation``;
* world size: ``torch.distributed.get_world_size()``, ranks per node from ``LOCAL_WORLD_SIZE`` (torchrun and the
  deepspeed launcher set it).

zero.Init cannot be read back after ``deepspeed.initialize``: at stage 3 every parameter has ``ds_id`` either way
(``initialize`` converts a whole model with ``Init(module=...)``, deepspeed/runtime/zero/parameter_offload.py
``_convert_to_zero_parameters``). It only changes the ``init`` phase, which a watch starts after; unless the caller
says, the larger case (no zero.Init) is assumed and named in the assumptions.
"""

from __future__ import annotations

import hashlib
import json
import os

from zeroest.estimator.configs import allocator, flat
from zeroest.estimator.core.architecture import shape_from_config
from zeroest.estimator.core.setup import TrainingSetup

_ATTN = {"sdpa": "sdpa", "eager": "eager", "flash_attention_2": "flash", "flash_attention_3": "flash"}
LOOPS = ("trainer", "custom", "custom-del")
"""What the loop keeps of the forward's output (issue 11's ``loop`` axis)."""


def optimizer_of(engine) -> tuple[str, str]:
    """(optimizer name, implementation) of the optimizer DeepSpeed runs (``engine.basic_optimizer``)."""
    opt = getattr(engine, "basic_optimizer", None) or getattr(engine, "client_optimizer", None)
    kind = type(opt).__name__
    group = (getattr(opt, "param_groups", None) or [{}])[0]
    if kind == "FusedAdam":
        return ("adamw" if getattr(opt, "adam_w_mode", True) else "adam"), "fused"
    if kind == "DeepSpeedCPUAdam":
        return ("adamw" if getattr(opt, "adamw_mode", True) else "adam"), "cpu"
    if kind in ("AdamW", "Adam"):
        return kind.lower(), "torch"
    if kind == "SGD":
        return ("sgd-momentum" if group.get("momentum") else "sgd"), "torch"
    if kind == "Adafactor":  # torch.optim's or transformers.optimization's: the same states by default
        return "adafactor", "torch"
    named = {"FusedLion": ("lion", "fused"), "DeepSpeedCPULion": ("lion", "cpu"), "AdamW8bit": ("adamw-8bit", "bnb"),
             "PagedAdamW8bit": ("paged-adamw-8bit", "bnb"),
             "MuonWithAuxAdam": ("muon", "torch" if type(getattr(opt, "aux_optimizer", None)).__name__ in
                                 ("AdamW", "Adam") else "fused")}
    if kind in named:
        return named[kind]
    raise ValueError(f"optimizer {kind} is not modelled (Adam, AdamW, SGD, Adafactor, Lion, Muon, bitsandbytes "
                     "AdamW8bit are): pass a ds_config optimizer section or a torch AdamW")


def _offload(section) -> tuple[str, bool | None]:
    if section is None:
        return "none", None
    device = str(getattr(getattr(section, "device", "none"), "value", getattr(section, "device", "none")))
    return device, bool(getattr(section, "pin_memory", False)) if device != "none" else None


def world() -> tuple[int, int]:
    """(world size, ranks per node) of the job; (1, 1) without a process group."""
    import torch.distributed as dist

    size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    return size, local if local and size % local == 0 else size


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def model_config(engine) -> dict:
    """The HF config of the engine's model as a plain dict (what config.json holds)."""
    config = getattr(engine.module, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise ValueError(f"the engine's module ({type(engine.module).__name__}) has no HF config: zeroest models "
                         "HF causal LMs (AutoModelForCausalLM)")
    return json.loads(config.to_json_string(use_diff=False))


def model_label(config: dict) -> str:
    """A file stem for the model: its hub name when it has one, else model_type, and a hash of the config."""
    blob = json.dumps({k: v for k, v in sorted(config.items()) if not k.startswith("_")}, sort_keys=True)
    digest = hashlib.sha1(blob.encode()).hexdigest()[:8]
    base = str(config.get("_name_or_path") or config.get("model_type") or "model").rstrip("/").rsplit("/", 1)[-1]
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in base) or "model"
    return f"{safe}-{digest}"


def _checkpointing(module) -> bool:
    """HF gradient checkpointing (``is_activation_checkpointing``, before transformers 5.2x
    ``is_gradient_checkpointing``)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(module), name):
            return bool(getattr(module, name))
    return False


def flat_setup(engine, *, micro_batch: int, seq_len: int, zero_init: bool | None = None,
               loop: str | None = None) -> tuple[dict, list[str]]:
    """The flat setup dict of the live job (``configs.flat`` keys, ``model`` left out) and the assumptions made."""
    notes: list[str] = []
    stage = int(engine.zero_optimization_stage())
    size, local = world()
    name, impl = optimizer_of(engine)
    groups = getattr(getattr(engine, "basic_optimizer", None), "param_groups", None) or [{}]
    group = groups[0]
    if impl == "torch" and group.get("fused"):
        notes.append(f"torch {name} with fused=True: estimated as torch's foreach/single-tensor path, whose step "
                     "temporaries the fused kernel does not allocate (the step estimate is high)")
    opt_dev, opt_pin = _offload(engine.zero_offload_optimizer())
    par_dev, par_pin = _offload(engine.zero_offload_param())
    pins = [p for p in (opt_pin, par_pin) if p is not None]
    configured = int(engine.train_micro_batch_size_per_gpu())
    if configured != micro_batch:
        notes.append(f"the first batch has {micro_batch} sequences, the ds_config's micro-batch is {configured}: "
                     f"estimated with {micro_batch}")
    if zero_init is None:
        zero_init = False
        if stage == 3:
            notes.append("zero.Init cannot be told after deepspeed.initialize: assumed not (the larger init "
                         "peak); pass zero_init=True if the model was built under it")
    config = engine.module.config
    attn = _ATTN.get(str(getattr(config, "_attn_implementation", "sdpa")), "sdpa")
    data = {
        "world_size": size, "gpus_per_node": local, "nodes": size // local,
        "dtype": "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32",
        "optimizer": name, "optimizer_impl": impl, "stage": stage, "param_groups": len(groups),
        "overlap_comm": bool(engine.zero_overlap_comm()),
        "contiguous_gradients": bool(engine.zero_contiguous_gradients()),
        "reduce_bucket_size": int(engine.zero_reduce_bucket_size()),
        "allgather_bucket_size": int(engine.zero_allgather_bucket_size()),
        "prefetch_bucket_size": int(engine.zero_prefetch_bucket_size()),
        "max_live_parameters": int(engine.zero_max_live_parameters()),
        "param_persistence_threshold": int(engine.zero_param_persistence_threshold()),
        "sub_group_size": int(engine.zero_sub_group_size()),
        "offload_optimizer": opt_dev, "offload_params": par_dev, "pin_memory": all(pins) if pins else True,
        "zero_init": bool(zero_init) and stage == 3,
        "micro_batch": int(micro_batch), "seq_len": int(seq_len),
        "grad_accum": int(engine.gradient_accumulation_steps()),
        "grad_ckpt": _checkpointing(engine.module),
        "attn": attn,
    }
    if loop is not None and "loop" in flat.SETUP_KEYS:
        data["loop"] = loop
    conf = allocator.conf_text(os.environ)  # what this process's caching allocator read at start
    data["expandable_segments"] = allocator.expandable(conf)
    if note := allocator.unmodelled_note(conf):
        notes.append(f"{note} (the reserved estimate assumes torch's defaults for them)")
    return data, notes


def live_setup(engine, *, micro_batch: int, seq_len: int, model_name: str, zero_init: bool | None = None,
               loop: str | None = None) -> tuple[TrainingSetup, list[str]]:
    """The ``TrainingSetup`` of the live job, the model named ``model_name`` (what rows write as ``model``)."""
    data, notes = flat_setup(engine, micro_batch=micro_batch, seq_len=seq_len, zero_init=zero_init, loop=loop)
    shape = shape_from_config(model_config(engine), model_name)
    return flat.setup_from_dict(data, model=shape, where="the live job's setup"), notes

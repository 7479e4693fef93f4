"""Ground truth for the estimator: what real DeepSpeed allocates per rank, measured on the CPU.

``probe(config)`` builds a tiny Hugging Face model, runs ``deepspeed.initialize`` and a few training steps as
rank
``config.rank`` of a ``config.world_size``-rank job (fake process group unless the caller already made a real
one,
see ``validate.fakepg``) and reports, after init, after each backward and each step, and inside the first
optimizer
step, the bytes DeepSpeed holds per category. Two independent measurements:

* introspection: every tensor reachable from the engine's optimizer objects and the model's parameters, each
  storage counted once and named by the attribute that owns it (``opt.bit16_groups_flat``,
  ``base.state.exp_avg``,
  ``param.ds_tensor`` ...), then grouped into the categories of ``CATEGORY_OF``;
* ``validate.memtrack.LiveBytes``: all live CPU storages, with per-phase peaks (init, forward, backward,
step).

docs/DEEPSPEED_ALLOCATIONS.md maps every attribute to the DeepSpeed file and function that allocates it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from zeroest.estimator.core.vocab import ZERO_KNOBS
from zeroest.validate.dsprobe_introspect import CATEGORIES, categorize, walk_storages

logger = logging.getLogger(__name__)

ModelName = Literal["llama", "gpt2"]


@dataclass(frozen=True, kw_only=True)
class ProbeConfig:
    """One probed training configuration (one rank of one job)."""

    model: ModelName = "llama"
    """Tiny model: "llama" (untied embeddings, 2 layers, ~2.2 M params) or "gpt2" (tied, biases, odd sizes,
    ~0.35 M)."""
    stage: int = 0
    """ZeRO stage 0-3."""
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Training dtype (``bf16.enabled`` / ``fp16.enabled`` / neither)."""
    grad_accum_dtype: Literal["fp32", "bf16", "fp16"] | None = None
    """``data_types.grad_accum_dtype``; None is DeepSpeed's default (the model dtype)."""
    offload_optimizer: bool = False
    """``offload_optimizer: {device: cpu}`` with DeepSpeedCPUAdam (stages 1-3)."""
    overlap_comm: bool | None = None
    """None: DeepSpeed's default (True at stage 3 only)."""
    contiguous_gradients: bool = True
    """``zero_optimization.contiguous_gradients``."""
    grad_accum: int = 1
    """``gradient_accumulation_steps``."""
    world_size: int = 1
    """N_d."""
    rank: int = 0
    """This process's rank."""
    steps: int = 3
    """Optimizer steps to run."""
    micro_batch: int = 1
    """Sequences per micro-batch."""
    seq_len: int = 16
    """Tokens per sequence."""
    reduce_bucket_size: int = 500_000_000
    """``zero_optimization.reduce_bucket_size`` (elements); DeepSpeed's default allocates it whole, see the
    doc."""
    allgather_bucket_size: int = 500_000_000
    """``zero_optimization.allgather_bucket_size`` (elements)."""
    param_persistence_threshold: int = 100_000
    """``stage3_param_persistence_threshold`` (elements)."""
    prefetch_bucket_size: int = 50_000_000
    """``stage3_prefetch_bucket_size`` (elements)."""
    sub_group_size: int = 1_000_000_000
    """``sub_group_size`` (elements)."""
    zero_init: bool = False
    """Stage 3: build the model under ``deepspeed.zero.Init`` instead of partitioning it in ``initialize``."""
    lora_rank: int | None = None
    """peft LoRA rank (``validate.adapters.apply_adapters``); None: no adapters."""
    lora_targets: str = "all-linear"
    """``LoraConfig.target_modules``."""
    modules_to_save: str = ""
    """``LoraConfig.modules_to_save``, comma-separated."""
    freeze: str = ""
    """``--freeze`` patterns (``core.adapters``): base weights with ``requires_grad = False``."""
    param_groups: int = 1
    """Parameter groups passed as ``model_parameters`` (2: the HF Trainer's weight decay and none)."""
    all_params: bool = False
    """Pass ``model.parameters()``, frozen ones included, as accelerate does (instead of the trainable groups)."""

    def adapters(self) -> Any:
        """The ``core.adapters.Adapters`` this probe trains with."""
        from zeroest.estimator.core.adapters import Adapters

        return Adapters(lora_rank=self.lora_rank, lora_targets=self.lora_targets,
                        modules_to_save=self.modules_to_save, freeze=self.freeze)

    def adapters_spec(self, model: Any) -> dict[str, Any]:
        """The worker's spec (``validate.adapters.apply_adapters``) for this probe's adapters on ``model``."""
        setup = {"model": f"probe-{self.model}", "lora_rank": self.lora_rank, "lora_targets": self.lora_targets,
                 "modules_to_save": self.modules_to_save, "freeze": self.freeze}
        return {"setup": setup, "model_config": model.config.to_dict()}

    def ds_config(self) -> dict[str, Any]:
        """The ds_config dict this probe passes to ``deepspeed.initialize``."""
        zero: dict[str, Any] = {"stage": self.stage}
        for knob in ZERO_KNOBS:  # our names -> DeepSpeed's keys, the table the config reader and writer use
            value = getattr(self, knob.name, None)
            if value is not None:
                zero[knob.ds_key] = value
        params: dict[str, Any] = {"lr": 1e-4, "weight_decay": 0.01}
        if self.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        else:
            params["torch_adam"] = True
        cfg: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": self.micro_batch,
            "gradient_accumulation_steps": self.grad_accum,
            "zero_optimization": zero,
            "optimizer": {"type": "AdamW", "params": params},
            "gradient_clipping": 1.0,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if self.dtype == "bf16":
            cfg["bf16"] = {"enabled": True}
        elif self.dtype == "fp16":
            cfg["fp16"] = {"enabled": True, "initial_scale_power": 8}
        if self.grad_accum_dtype is not None:
            cfg["data_types"] = {"grad_accum_dtype": self.grad_accum_dtype}
        return cfg

    def name(self) -> str:
        """A file-name-safe label."""
        parts = [self.model, f"z{self.stage}", self.dtype, f"n{self.world_size}", f"g{self.grad_accum}"]
        if self.grad_accum_dtype:
            parts.append(f"acc{self.grad_accum_dtype}")
        if self.offload_optimizer:
            parts.append("off")
        if self.overlap_comm is not None:
            parts.append(f"ov{int(self.overlap_comm)}")
        if not self.contiguous_gradients:
            parts.append("nocg")
        if self.zero_init:
            parts.append("zinit")
        if self.lora_rank:
            parts.append(f"lora{self.lora_rank}")
        for label, text in (("save", self.modules_to_save), ("freeze", self.freeze)):
            if text:
                parts.append(label + re.sub(r"[^A-Za-z0-9]+", "-", text))
        if self.param_groups != 1:
            parts.append(f"pg{self.param_groups}")
        if self.all_params:
            parts.append("all")
        return "_".join(parts)


def build_model(name: ModelName, dtype: str) -> Any:
    """A tiny causal LM in ``dtype``: tensors from 64 to 262,144 elements, some under stage 3's 1e5
    threshold."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    if name == "llama":
        cfg = LlamaConfig(
            vocab_size=1024,
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(cfg)
    elif name == "gpt2":
        # Odd sizes on purpose (100-wide, 1001-token vocabulary, 63 positions): flat groups and stage 3
        # partitions then need padding to a multiple of the world size.
        cfg = GPT2Config(vocab_size=1001, n_embd=100, n_layer=2, n_head=4, n_positions=63)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(f"unknown probe model {name!r}: use 'llama' or 'gpt2'")
    return model.to(torch_dtype)


def _snapshot(engine: Any, model: Any, tracker: Any) -> dict[str, Any]:
    owners = walk_storages(engine, model)
    by_category = categorize(owners)
    attributed = sum(by_category.values())
    return {
        "live_bytes": tracker.live_bytes,
        "attributed_bytes": attributed,
        "unattributed_bytes": tracker.live_bytes - attributed,
        "categories": by_category,
        "owners": {path: nbytes for path, nbytes in sorted(owners.items())},
    }


def _model_facts(model: Any) -> dict[str, Any]:
    params = list(model.parameters())
    numels = [p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params]
    trainable = [n for n, p in zip(numels, params, strict=True) if p.requires_grad]
    return {"psi": int(sum(numels)), "n_tensors": len(numels), "numels": [int(n) for n in numels],
            "trainable": int(sum(trainable)), "trainable_numels": [int(n) for n in trainable]}


def probe(config: ProbeConfig) -> dict[str, Any]:
    """Run ``config`` as one rank and return the measured allocations (see the module docstring).

    If ``torch.distributed`` is not initialised yet, a fake world of ``config.world_size`` ranks is made
    (``validate.fakepg.init_fake_world``); a real one made by the caller (``run_gloo``) is used as it is.
    """
    import deepspeed
    import torch
    import torch.distributed as dist
    from zeroest.validate.adapters import apply_adapters, parameter_groups
    from zeroest.validate.fakepg import init_fake_world
    from zeroest.validate.memtrack import LiveBytes

    if not dist.is_initialized() or dist.get_backend() == "fake":
        init_fake_world(config.rank, config.world_size)
    if dist.get_world_size() != config.world_size:
        raise ValueError(
            f"the process group has {dist.get_world_size()} ranks but the probe asks for "
            f"{config.world_size}: make them agree"
        )
    ds_config = config.ds_config()
    tracker = LiveBytes(device="cpu")
    record: dict[str, Any] = {"config": asdict(config), "ds_config": ds_config, "snapshots": {}}
    with tracker:
        with tracker.phase("model"):
            if config.stage == 3 and config.zero_init:
                with deepspeed.zero.Init(config_dict_or_path=ds_config):
                    model = build_model(config.model, config.dtype)
            else:
                model = build_model(config.model, config.dtype)
            model, _ = apply_adapters(model, config.adapters_spec(model))
        record["model"] = _model_facts(model)
        record["snapshots"]["model"] = {"live_bytes": tracker.live_bytes}
        if config.dtype == "fp16":
            _allow_fp16_on_cpu()
        with tracker.phase("init"):
            groups = model.parameters() if config.all_params else parameter_groups(model, config.param_groups)
            engine, optimizer, _, _ = deepspeed.initialize(model=model, config=ds_config, model_parameters=groups)
        record["optimizer_class"] = type(optimizer).__name__
        record["base_optimizer_class"] = type(engine.basic_optimizer).__name__
        record["snapshots"]["init"] = _snapshot(engine, model, tracker)
        _wrap_base_step(engine, model, tracker, record)
        vocab = model.config.vocab_size
        gen = torch.Generator().manual_seed(1)
        for step in range(1, config.steps + 1):
            for micro in range(config.grad_accum):
                ids = torch.randint(0, vocab, (config.micro_batch, config.seq_len), generator=gen)
                tag = f"s{step}m{micro}"
                with tracker.phase(f"{tag}.fwd"):
                    loss = engine(input_ids=ids, labels=ids).loss
                with tracker.phase(f"{tag}.bwd"):
                    engine.backward(loss)
                del loss
                record["snapshots"][f"{tag}.bwd"] = _snapshot(engine, model, tracker)
                with tracker.phase(f"{tag}.step"):
                    engine.step()
                record["snapshots"][f"{tag}.step"] = _snapshot(engine, model, tracker)
    record["phases"] = {name: asdict(p) for name, p in tracker.phases.items()}
    record["peak_bytes"] = tracker.peak_bytes
    engine.destroy()
    return record


def _allow_fp16_on_cpu() -> None:
    """Let DeepSpeed's fp16 path run on a CPU without oneDNN fp16 (deepspeed/runtime/engine.py
    ``_do_sanity_check`` asks ``CPU_Accelerator.is_fp16_supported``). Memory layout does not depend on the
    device."""
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() == "cpu" and not accel.is_fp16_supported():
        accel.is_fp16_supported = lambda: True


def _wrap_base_step(engine: Any, model: Any, tracker: Any, record: dict[str, Any]) -> None:
    """Snapshot once inside the first base-optimizer step: the fp32 gradient partitions exist only then."""
    base = engine.basic_optimizer
    real_step = base.step

    def step(*args: Any, **kwargs: Any) -> Any:
        if "in_base_step" not in record["snapshots"]:
            record["snapshots"]["in_base_step"] = _snapshot(engine, model, tracker)
        out = real_step(*args, **kwargs)
        if "after_base_step" not in record["snapshots"]:
            record["snapshots"]["after_base_step"] = _snapshot(engine, model, tracker)
        return out

    base.step = step


def summary(record: dict[str, Any], snapshot: str = "s1m0.step") -> dict[str, int]:
    """Category bytes of one snapshot, with ``live`` and ``unattributed`` (for tables and assertions)."""
    snap = record["snapshots"][snapshot]
    out = {cat: int(snap["categories"].get(cat, 0)) for cat in CATEGORIES}
    out["live"] = int(snap["live_bytes"])
    out["unattributed"] = int(snap["unattributed_bytes"])
    return out


def last_step_snapshot(record: dict[str, Any]) -> str:
    """Name of the snapshot after the last engine.step()."""
    names = [n for n in record["snapshots"] if re.fullmatch(r"s\d+m\d+\.step", n)]
    return names[-1]


def default_matrix() -> list[ProbeConfig]:
    """The configurations recorded in data/probe/ (fake world sizes 4 and 8; size 1 needs no peers)."""
    small = {"reduce_bucket_size": 200_000, "allgather_bucket_size": 200_000, "steps": 2}
    out: list[ProbeConfig] = []
    for model in ("llama", "gpt2"):
        for world in (1, 4, 8):
            for stage in (0, 1, 2, 3):
                out.append(ProbeConfig(model=model, stage=stage, dtype="bf16", world_size=world, **small))
    for stage in (0, 1, 2, 3):
        out.append(ProbeConfig(stage=stage, dtype="fp16", world_size=4, **small))
        out.append(ProbeConfig(stage=stage, dtype="fp32", world_size=4, **small))
        out.append(ProbeConfig(stage=stage, dtype="bf16", world_size=4, grad_accum=2, **small))
    for stage in (1, 2, 3):
        out.append(ProbeConfig(stage=stage, dtype="bf16", world_size=4, grad_accum_dtype="fp32", **small))
        out.append(ProbeConfig(stage=stage, dtype="bf16", world_size=4, offload_optimizer=True, **small))
        out.append(ProbeConfig(stage=stage, dtype="bf16", world_size=4, overlap_comm=True, **small))
        out.append(ProbeConfig(stage=stage, dtype="bf16", world_size=4, overlap_comm=False, **small))
        out.append(ProbeConfig(stage=stage, dtype="fp16", world_size=4, offload_optimizer=True, **small))
    out.append(ProbeConfig(stage=3, dtype="bf16", world_size=4, zero_init=True, **small))
    out.append(ProbeConfig(stage=2, dtype="bf16", world_size=4, contiguous_gradients=False, **small))
    out.append(ProbeConfig(stage=1, dtype="bf16", world_size=4, steps=2))  # DeepSpeed's default 5e8 buckets
    out.append(ProbeConfig(stage=2, dtype="bf16", world_size=4, steps=2))
    for stage in (0, 1, 2, 3):  # frozen parameters: peft LoRA on all linears, a --freeze, a modules_to_save copy
        for adapters in ({"lora_rank": 8, "all_params": True}, {"freeze": "embeddings,layers:1"},
                         {"lora_rank": 8, "modules_to_save": "lm_head", "all_params": True}):
            out.append(ProbeConfig(stage=stage, dtype="bf16", world_size=4, **adapters, **small))
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m zeroest.validate.dsprobe OUT_DIR [NAME_FILTER]``: run ``default_matrix()`` into
    OUT_DIR/*.json."""
    import json
    import sys
    from pathlib import Path

    args = sys.argv[1:] if argv is None else argv
    out_dir = Path(args[0] if args else "data/probe")
    pattern = args[1] if len(args) > 1 else ""
    out_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO)
    for config in default_matrix():
        if pattern not in config.name():
            continue
        record = probe(config)
        (out_dir / f"{config.name()}.json").write_text(json.dumps(record, indent=1, sort_keys=True))
        logger.info("%s: %s", config.name(), summary(record, last_step_snapshot(record)))


if __name__ == "__main__":
    main()

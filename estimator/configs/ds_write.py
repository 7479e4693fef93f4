"""The ds_config.json DeepSpeed needs to train a ``TrainingSetup``: what ``validate`` hands to
``deepspeed.initialize``.

Pure: no torch or deepspeed import. Key names are DeepSpeed's own (``deepspeed/runtime/config.py``,
``deepspeed/runtime/zero/config.py`` ``DeepSpeedZeroConfig``, ``deepspeed/runtime/zero/offload_config.py``).

Optimizer choice, as ``deepspeed/runtime/engine.py`` ``_configure_basic_optimizer`` reads it:

* impl ``fused``: ``{"type": "AdamW"}`` with nothing else gives DeepSpeed's FusedAdam (multi-tensor CUDA
  kernel).
* impl ``torch``: ``"torch_adam": true`` gives ``torch.optim.AdamW`` (foreach by default).
* impl ``cpu``: an offloaded optimizer makes DeepSpeed build ``DeepSpeedCPUAdam`` itself
  (``zero_use_cpu_optimizer``).
* ``{"type": "Lion"}`` gives FusedLion (DeepSpeedCPULion offloaded); ``{"type": "Muon"}`` gives
  ``MuonWithAuxAdam`` (Muon for the hidden matrices, FusedAdam for the rest).
* sgd / sgd-momentum / adafactor are not DeepSpeed names; DeepSpeed falls back to ``torch.optim.<type>``, by
  exact name (``getattr(torch.optim, "SGD")``, ``"Adafactor"``).
* adamw-8bit / paged-adamw-8bit (bitsandbytes) are client optimizers: no optimizer section, the script passes
  ``deepspeed.initialize(optimizer=...)`` (``validate.client_optimizers``).

Every optimizer ZeRO does not list as tested (runtime/zero/utils.py ``ZERO_SUPPORTED_OPTIMIZERS``) needs
``zero_allow_untested_optimizer: true`` (engine.py ``_do_optimizer_sanity_check`` asserts it).
"""

from __future__ import annotations

from zeroest.estimator.core.setup import TrainingSetup
from zeroest.estimator.core.vocab import EIGHT_BIT, ZERO_KNOBS, OptimizerName

LEARNING_RATE = 1e-4
"""Learning rate of the synthetic runs; memory does not depend on it."""
GRADIENT_CLIPPING = 1.0
"""``gradient_clipping``: clipping computes a global norm, which DeepSpeed does in every real job we model."""
STEPS_PER_PRINT = 10**9
"""Large, so DeepSpeed never logs a step (logging syncs and allocates)."""
FP16_INITIAL_SCALE_POWER = 8
"""fp16 starts at loss scale 2**8, not DeepSpeed's 2**16, so fewer of the first steps overflow and are skipped
(a skipped step still allocates everything a real one does in ZeRO 1-3, whose optimizer states exist from
init)."""

_NAMED_SECTIONS = {
    "sgd": ("SGD", {"momentum": 0.0}),
    "sgd-momentum": ("SGD", {"momentum": 0.9}),
    "adafactor": ("Adafactor", {}),
    "lion": ("Lion", {"betas": [0.9, 0.99], "weight_decay": 0.01}),
    "muon": ("Muon", {"momentum": 0.95, "weight_decay": 0.01}),
}
ZERO_TESTED: frozenset[str] = frozenset({OptimizerName.ADAM, OptimizerName.ADAMW, OptimizerName.LION,
                                         OptimizerName.MUON})
"""Optimizers of ours that ZeRO lists as tested (runtime/zero/utils.py ``is_zero_supported_optimizer``: torch and
Fused Adam/AdamW, DeepSpeedCPUAdam, FusedLion, DeepSpeedCPULion, MuonWithAuxAdam)."""


def _optimizer_section(setup: TrainingSetup) -> dict | None:
    name, impl = setup.optimizer.name, setup.optimizer.impl
    if name in EIGHT_BIT:
        return None
    if name in _NAMED_SECTIONS:
        type_name, extra = _NAMED_SECTIONS[name]
        params = {"lr": LEARNING_RATE, **extra}
        if name == "muon" and impl == "torch":
            params["torch_adam"] = True
        return {"type": type_name, "params": params}
    params: dict = {"lr": LEARNING_RATE, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}
    if impl == "torch":
        params["torch_adam"] = True
    return {"type": "AdamW" if name == "adamw" else "Adam", "params": params}


def _offload(device: str, pin_memory: bool, nvme_path: str | None) -> dict:
    section: dict = {"device": device, "pin_memory": pin_memory}
    if device == "nvme":
        section["nvme_path"] = nvme_path or "/local_nvme"
    return section


def _zero_section(setup: TrainingSetup, nvme_path: str | None) -> dict:
    """Every knob of ``vocab.ZERO_KNOBS`` the stage reads, under DeepSpeed's key; ``overlap_comm`` resolved."""
    zero = setup.zero
    section: dict = {"stage": int(zero.stage)}
    for knob in ZERO_KNOBS:
        if zero.stage >= knob.min_stage:
            section[knob.ds_key] = zero.overlap if knob.name == "overlap_comm" else getattr(zero, knob.name)
    if zero.offload_optimizer != "none":
        section["offload_optimizer"] = _offload(zero.offload_optimizer, zero.pin_memory, nvme_path)
    if zero.offload_params != "none":
        section["offload_param"] = _offload(zero.offload_params, zero.pin_memory, nvme_path)
    if muon_needs_no_reduce_scatter(int(zero.stage), setup.optimizer.name):
        section["reduce_scatter"] = False
    return section


def muon_needs_no_reduce_scatter(stage: int, optimizer: str) -> bool:
    """Stage 3 refuses Muon with ``reduce_scatter`` on, its default (stage3.py ``DeepSpeedZeroOptimizer_Stage3``:
    "Muon and reduce scatter cannot be used together")."""
    return stage == 3 and optimizer == OptimizerName.MUON


def ds_config(setup: TrainingSetup, *, nvme_path: str | None = None) -> dict:
    """The ds_config dict for ``setup``: batch sizes, precision, optimizer and every ZeRO knob zeroest models.

    ``train_batch_size = micro_batch * grad_accum * N_d`` (DeepSpeed checks this identity at init,
    ``deepspeed/runtime/config.py`` ``_batch_assertion``). ``nvme_path`` is where NVMe offload swaps.
    """
    work = setup.workload
    config: dict = {
        "train_micro_batch_size_per_gpu": work.micro_batch,
        "gradient_accumulation_steps": work.grad_accum,
        "train_batch_size": work.micro_batch * work.grad_accum * setup.world_size,
        "bf16": {"enabled": setup.dtype == "bf16"},
        "fp16": {"enabled": setup.dtype == "fp16"},
        "zero_optimization": _zero_section(setup, nvme_path),
        "gradient_clipping": GRADIENT_CLIPPING,
        "steps_per_print": STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }
    section = _optimizer_section(setup)
    if section is not None:
        config["optimizer"] = section
    if setup.dtype == "fp16":
        config["fp16"].update({"loss_scale": 0, "initial_scale_power": FP16_INITIAL_SCALE_POWER})
    if setup.optimizer.name not in ZERO_TESTED:
        config["zero_allow_untested_optimizer"] = True
    return config


TRAINER_AUTO: tuple[str, ...] = (
    "train_batch_size",
    "gradient_clipping",
    "optimizer.params.lr",
    "optimizer.params.betas",
    "optimizer.params.eps",
    "optimizer.params.weight_decay",
)
"""Keys the HF Trainer fills from ``TrainingArguments`` and checks against them
(transformers/integrations/deepspeed.py ``HfTrainerDeepSpeedConfig.trainer_config_process``: ``fill_match`` of
``train_batch_size``, ``gradient_clipping`` = max_grad_norm, ``optimizer.params.lr`` / ``betas`` / ``eps`` /
``weight_decay``); memory depends on none of their values, so the written file says "auto" and the Trainer's
arguments decide. Micro-batch, accumulation and precision stay the plan's numbers: the Trainer checks them
against ``per_device_train_batch_size``, ``gradient_accumulation_steps`` and ``--bf16``/``--fp16``."""


def trainer_ds_config(setup: TrainingSetup, *, nvme_path: str | None = None) -> dict:
    """``ds_config(setup)`` for the HF Trainer: ``TRAINER_AUTO`` keys set to "auto", so
    ``HfTrainerDeepSpeedConfig.trainer_config_process`` fills them instead of stopping on a mismatch."""
    config = ds_config(setup, nvme_path=nvme_path)
    for dotted in TRAINER_AUTO:
        *parents, key = dotted.split(".")
        node = config
        for name in parents:
            node = node.get(name, {})
        if key in node:
            node[key] = "auto"
    return config


def trainer_arguments(setup: TrainingSetup) -> str:
    """The ``TrainingArguments`` flags that match ``trainer_ds_config(setup)``'s fixed numbers."""
    work = setup.workload
    precision = {"bf16": " --bf16", "fp16": " --fp16"}.get(str(setup.dtype), "")
    return (f"--per_device_train_batch_size {work.micro_batch} --gradient_accumulation_steps {work.grad_accum}"
            f"{precision}")

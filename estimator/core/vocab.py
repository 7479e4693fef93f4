"""The one vocabulary of a training setup: every choice, every default, every rule, and the ds_config keys.

The CLI takes these ``StrEnum``s as typer option types, ``TrainingSetup`` stores them, the flat dict of grids and
runs.jsonl rows holds their values, the config reader and writer and the validator call the rules below. A new
choice is a member here; a new axis is a field of ``core/setup.py`` (flag and help in its metadata) plus a rule
here if its default depends on other knobs. Nothing else spells a choice or a default.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum


class ZeroStage(IntEnum):
    """ZeRO stages, ordered so code reads like the paper: ``if stage >= ZeroStage.GRADIENTS``."""

    DISABLED = 0
    """Plain data parallelism: every rank holds every model state."""
    OPTIMIZER_STATES = 1
    """P_os: fp32 master weights and optimizer states partitioned over N_d ranks."""
    GRADIENTS = 2
    """P_os+g: gradients partitioned too."""
    PARAMETERS = 3
    """P_os+g+p: 16-bit parameters partitioned too, gathered layer by layer."""


class Dtype(StrEnum):
    """Training precision: bf16/fp16 mixed precision (fp32 master weights), or pure fp32."""

    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


DTYPE_BYTES: dict[str, int] = {Dtype.BF16: 2, Dtype.FP16: 2, Dtype.FP32: 4}


class OptimizerName(StrEnum):
    """The optimizer; ``core.optimizers`` holds the state each keeps and the tensors it sees at each stage."""

    ADAMW = "adamw"
    """exp_avg and exp_avg_sq, fp32."""
    ADAM = "adam"
    """As adamw (L2 instead of decoupled weight decay)."""
    SGD = "sgd"
    """No state."""
    SGD_MOMENTUM = "sgd-momentum"
    """momentum_buffer, fp32."""
    ADAFACTOR = "adafactor"
    """``torch.optim.Adafactor`` (ds_config type "Adafactor") or transformers' Adafactor (beta1 None): row and
    column second moments of a >= 2-D tensor, the full second moment of a 1-D one (every ZeRO partition)."""
    ADAMW_8BIT = "adamw-8bit"
    """bitsandbytes ``AdamW8bit``, a client optimizer: two uint8 states plus an fp32 absmax per 256-element block;
    tensors under ``min_8bit_size`` keep fp32 states."""
    PAGED_ADAMW_8BIT = "paged-adamw-8bit"
    """bitsandbytes ``PagedAdamW8bit``: as adamw-8bit, states of tensors >= 1e5 elements in CUDA managed memory."""
    LION = "lion"
    """DeepSpeed's FusedLion (DeepSpeedCPULion offloaded): exp_avg, fp32."""
    MUON = "muon"
    """DeepSpeed's MuonWithAuxAdam (ds_config type "Muon"): a momentum buffer for the hidden matrices, Adam for
    embeddings, lm_head and vectors."""


ADAM_FAMILY: frozenset[str] = frozenset({OptimizerName.ADAM, OptimizerName.ADAMW})
"""The optimizers FusedAdam and DeepSpeedCPUAdam implement (deepspeed/ops/adam)."""
EIGHT_BIT: frozenset[str] = frozenset({OptimizerName.ADAMW_8BIT, OptimizerName.PAGED_ADAMW_8BIT})
"""bitsandbytes' 8-bit optimizers: client optimizers passed to ``deepspeed.initialize(optimizer=...)``."""
FUSED_KERNELS: frozenset[str] = ADAM_FAMILY | {OptimizerName.LION, OptimizerName.MUON}
"""Built by DeepSpeed from ds_config with a fused CUDA kernel (engine.py ``_configure_basic_optimizer``: FusedAdam,
FusedLion, and MuonWithAuxAdam whose auxiliary Adam is FusedAdam)."""
CPU_OPTIMIZERS: frozenset[str] = ADAM_FAMILY | {OptimizerName.LION}
"""What DeepSpeed runs on an offloaded optimizer: DeepSpeedCPUAdam and DeepSpeedCPULion
(``get_optimizer_configuration``, ``_configure_basic_optimizer``)."""


class OptimizerImpl(StrEnum):
    """fused: DeepSpeed's fused kernel; torch: ``torch_adam: true`` or a torch optimizer; cpu: DeepSpeed's CPU
    optimizer (offload); bnb: a bitsandbytes client optimizer."""

    FUSED = "fused"
    TORCH = "torch"
    CPU = "cpu"
    BNB = "bnb"


class BaseQuant(StrEnum):
    """Storage of the frozen base weights under LoRA: as trained (none), or bitsandbytes 4-bit NF4 (QLoRA,
    ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``), with double quantisation of the
    block constants (``bnb_4bit_use_double_quant=True``) or without."""

    NONE = "none"
    NF4 = "nf4"
    NF4_DQ = "nf4-dq"


class OffloadDevice(StrEnum):
    """Where offloaded states live (``offload_optimizer.device`` / ``offload_param.device``)."""

    NONE = "none"
    CPU = "cpu"
    NVME = "nvme"


class Attention(StrEnum):
    """Attention kernel: sdpa (torch's memory-efficient/flash kernels), flash (flash-attention-2), eager."""

    SDPA = "sdpa"
    FLASH = "flash"
    EAGER = "eager"


class ActivationMode(StrEnum):
    """traced: meta-device trace of the real HF model (needs torch); closed-form; auto: traced when possible."""

    AUTO = "auto"
    TRACED = "traced"
    CLOSED_FORM = "closed-form"


class Mode(StrEnum):
    """deepspeed: what DeepSpeed really allocates; paper: the ZeRO paper's model states, (2 + 2 + K) Psi."""

    DEEPSPEED = "deepspeed"
    PAPER = "paper"


class Loop(StrEnum):
    """What the training loop keeps of the model's output object (``CausalLMOutputWithPast``: the loss and the
    b x s x V logits) after the forward returns."""

    TRAINER = "trainer"
    """Only the loss leaves the forward: transformers' Trainer ``compute_loss`` returns ``outputs["loss"]`` and
    drops the output object before ``training_step`` calls backward (TRL's trainers inherit it)."""
    CUSTOM = "custom"
    """A for-loop that reassigns ``outputs = model(**batch)``: the output lives through backward and step, and
    until the next micro-step's forward returns (the accelerate examples' loop)."""
    CUSTOM_DEL = "custom-del"
    """The same loop with ``del outputs`` after the optimizer step: the output lives through backward and step."""


class Launcher(StrEnum):
    """How the job's ranks are started."""

    TORCHRUN = "torchrun"
    ACCELERATE = "accelerate"
    DEEPSPEED = "deepspeed"


class Builder(StrEnum):
    """Who builds the model, which decides zero.Init (``zero_init_default``)."""

    SCRIPT = "script"
    """A plain training script: ``from_config``/``from_pretrained`` before ``deepspeed.initialize``."""
    HF_TRAINER = "hf-trainer"
    """transformers' Trainer (a ds_config with "auto" values): TrainingArguments(deepspeed=...) makes an
    ``HfTrainerDeepSpeedConfig`` before the model is loaded."""
    ACCELERATE = "accelerate"
    """``accelerate launch`` with a DeepSpeed plugin: its ``zero3_init_flag`` decides."""


def choice(kind: type[StrEnum], value, flag: str) -> StrEnum:
    """``value`` as a member of ``kind``, or ValueError naming the flag and every choice."""
    try:
        return kind(value)
    except ValueError:
        names = ", ".join(member.value for member in kind)
        raise ValueError(f"{flag} must be one of {names}, got {value!r}") from None


# ---- rules -------------------------------------------------------------------------------------------------------


def default_optimizer_impl(name: str, offload_optimizer: str) -> OptimizerImpl:
    """The implementation DeepSpeed runs for ``name`` (``deepspeed/runtime/engine.py`` ``_configure_basic_optimizer``).

    With the optimizer offloaded DeepSpeed builds DeepSpeedCPUAdam or DeepSpeedCPULion itself
    (``zero_use_cpu_optimizer``); Adam, AdamW, Lion and Muon otherwise run a fused kernel (``FUSED_KERNELS``);
    bitsandbytes' 8-bit AdamW is the user's client optimizer; any other optimizer is ``torch.optim``'s.
    """
    if offload_optimizer != OffloadDevice.NONE:
        return OptimizerImpl.CPU
    if name in EIGHT_BIT:
        return OptimizerImpl.BNB
    return OptimizerImpl.FUSED if name in FUSED_KERNELS else OptimizerImpl.TORCH


def zero_init_default(stage: int, builder: Builder, zero3_init_flag: bool | None = None) -> bool:
    """Whether the model is built under ``deepspeed.zero.Init`` (so it is never whole on one GPU).

    Only stage 3 partitions at construction (``deepspeed/runtime/zero/partition_parameters.py`` ``Init``).
    The HF Trainer does it for a ZeRO-3 ds_config (transformers/integrations/deepspeed.py
    ``is_deepspeed_zero3_enabled``, checked by ``PreTrainedModel.from_pretrained``/``_from_config``);
    accelerate does it when ``zero3_init_flag`` is on, and when the flag is unset it falls back to "the
    config is ZeRO-3" (accelerate/utils/dataclasses.py ``DeepSpeedPlugin.__post_init__``); a plain script does
    not, which is also the larger case, assumed when nothing says otherwise.
    """
    if stage < ZeroStage.PARAMETERS:
        return False
    if builder == Builder.HF_TRAINER:
        return True
    if builder == Builder.ACCELERATE:
        return True if zero3_init_flag is None else bool(zero3_init_flag)
    return False


ZERO_INIT_RULE = (
    "default: off (a plain script builds the model whole); the HF Trainer with a ZeRO-3 ds_config, and "
    "accelerate with zero3_init_flag on, build it under zero.Init"
)
"""The zero.Init rule in words, for ``--help`` and the printed assumptions."""


def loop_default(builder: Builder | None) -> Loop:
    """The loop a job most likely runs when ``--loop`` is not given.

    A ds_config with "auto" values is written for the HF Trainer, whose ``compute_loss`` keeps only the loss; an
    accelerate config, a plain ds_config or flags alone (``builder`` None) mean a loop of the user's own, which
    is assumed to keep its ``outputs`` (the larger case).
    """
    return Loop.TRAINER if builder == Builder.HF_TRAINER else Loop.CUSTOM


LOOP_RULE = (
    "default: custom with flags alone, an accelerate config or a plain ds_config; trainer for a ds_config with "
    "\"auto\" values (the HF Trainer's)"
)
"""The loop rule in words, for ``--help`` and the printed assumptions."""

def param_groups_default(builder: Builder | None, optimizer_section: bool) -> int:
    """How many parameter groups the optimizer DeepSpeed wraps has, when ``--param-groups`` is not given.

    transformers' Trainer builds its own optimizer (no ds_config optimizer section) with two groups, weight decay
    and none (trainer.py ``create_optimizer``, ``get_decay_parameter_names``), and accelerate's examples group the
    same way; with an optimizer section the Trainer passes one list of the trainable parameters
    (integrations/deepspeed.py ``deepspeed_optim_sched``). Elsewhere the grouping is the script's: two, the larger
    case at stage 2 (``model_states.stage12_states``).
    """
    return 1 if builder == Builder.HF_TRAINER and optimizer_section else 2


PARAM_GROUPS_RULE = (
    "default: 2 (weight decay and none, as the HF Trainer's own optimizer and accelerate's examples group them); 1 "
    "for an HF Trainer ds_config with an optimizer section"
)
"""The parameter-group rule in words, for ``--help`` and the printed assumptions."""


def weight_decays(name: str) -> bool:
    """Whether a parameter goes to the first of the two groups (weight decay): not a bias or a norm weight, by name,
    as transformers' ``Trainer.get_decay_parameter_names`` decides for the usual layers."""
    return "bias" not in name and "norm" not in name.lower()

MEASURED_BEFORE_KEY: dict[str, object] = {"loop": Loop.TRAINER, "param_groups": 1}
"""What a runs.jsonl row written before a setup key existed was measured with: the validator's worker ran only
the Trainer's loop (``loss = engine(...).loss``) before ``loop`` was a key, and passed one list of parameters
before ``param_groups`` was one. Not the user's default."""


def check_offload(stage: int, offload_optimizer: str, offload_params: str, optimizer: str | None = None) -> None:
    """ValueError unless DeepSpeed accepts this offload at this stage.

    ZeRO-Offload needs ZeRO >= 1 and runs DeepSpeedCPUAdam (Adam/AdamW only); optimizer offload to NVMe and any
    parameter offload need stage 3 (ZeRO-Infinity, ``deepspeed/runtime/zero/stage3.py``); parameters are
    offloaded only with the optimizer offloaded too (``offload_config.py``).
    """
    if offload_optimizer != OffloadDevice.NONE and stage < ZeroStage.OPTIMIZER_STATES:
        raise ValueError("optimizer offload needs ZeRO stage 1 or more (DeepSpeed ignores it at stage 0): "
                         "use --stage 1, 2 or 3, or drop --offload-optimizer")
    if offload_params != OffloadDevice.NONE and stage < ZeroStage.PARAMETERS:
        raise ValueError(f"parameter offload needs ZeRO stage 3, but the stage is {int(stage)}: "
                         "use --stage 3 or drop --offload-params")
    if offload_optimizer == OffloadDevice.NVME and stage < ZeroStage.PARAMETERS:
        raise ValueError("optimizer offload to NVMe needs ZeRO stage 3 (ZeRO-Infinity): use --stage 3 or cpu")
    if offload_optimizer == OffloadDevice.NONE and offload_params != OffloadDevice.NONE:
        raise ValueError("DeepSpeed offloads parameters only with the optimizer offloaded too: "
                         "set --offload-optimizer")
    if optimizer is None or offload_optimizer == OffloadDevice.NONE or optimizer in CPU_OPTIMIZERS:
        return
    if optimizer in EIGHT_BIT:
        raise ValueError(f"DeepSpeed refuses a client optimizer ({optimizer}, bitsandbytes) with optimizer offload "
                         "(engine.py _configure_optimizer raises ZeRORuntimeException): use --optimizer adamw or "
                         "drop --offload-optimizer")
    if optimizer == OptimizerName.MUON:
        raise ValueError("Muon with optimizer offload is not modelled by zeroest: drop --offload-optimizer or use "
                         "--optimizer adamw")
    raise ValueError(f"optimizer offload runs DeepSpeedCPUAdam or DeepSpeedCPULion (Adam, AdamW or Lion), not "
                     f"{optimizer}: use --optimizer adamw or lion, or drop --offload-optimizer")


def offload_allowed(stage: int, offload_optimizer: str, offload_params: str, optimizer: str) -> bool:
    """``check_offload`` as a predicate (for searches over the combinations)."""
    try:
        check_offload(stage, offload_optimizer, offload_params, optimizer)
    except ValueError:
        return False
    return True


def default_stages(offload_optimizer: str, offload_params: str) -> tuple[int, ...]:
    """The stages ``predict`` shows when none is asked for: those that accept the offload asked for."""
    return tuple(s for s in ZeroStage if offload_allowed(s, offload_optimizer, offload_params, OptimizerName.ADAMW))


def hf_trainer_auto(*, hidden_size: int, micro_batch: int, grad_accum: int, world_size: int, dtype: str,
                    stage: int | None, max_grad_norm: float = 1.0) -> dict[str, object]:
    """The values the HF Trainer puts in place of "auto", by dotted ds_config key.

    transformers/integrations/deepspeed.py ``HfTrainerDeepSpeedConfig.trainer_config_process``: micro-batch,
    accumulation, ``train_batch_size`` = world x micro x accumulation, clipping, the precision flags;
    ``trainer_config_finalize``: ``reduce_bucket_size`` = h^2 and, at stage 3, ``stage3_prefetch_bucket_size`` =
    int(0.9 h^2) and ``stage3_param_persistence_threshold`` = 10 h, h the hidden size.
    """
    values: dict[str, object] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": world_size * micro_batch * grad_accum,
        "gradient_clipping": max_grad_norm,
        "fp16.enabled": dtype == Dtype.FP16,
        "bf16.enabled": dtype == Dtype.BF16,
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
    }
    if stage == ZeroStage.PARAMETERS:
        values["zero_optimization.stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
        values["zero_optimization.stage3_param_persistence_threshold"] = 10 * hidden_size
    return values


# ---- ZeRO knobs and their ds_config keys ------------------------------------------------------------------------


@dataclass(frozen=True)
class ZeroKnob:
    """One numeric or boolean ZeRO knob: our field name, DeepSpeed's key under ``zero_optimization``, its default
    (``deepspeed/runtime/zero/config.py`` ``DeepSpeedZeroConfig``, DeepSpeed 0.19.8) and the lowest stage that
    reads it."""

    name: str
    ds_key: str
    default: int | bool | None
    min_stage: int = 0
    kind: type = int


ZERO_KNOBS: tuple[ZeroKnob, ...] = (
    ZeroKnob("overlap_comm", "overlap_comm", None, kind=bool),
    ZeroKnob("contiguous_gradients", "contiguous_gradients", True, kind=bool),
    ZeroKnob("reduce_bucket_size", "reduce_bucket_size", 500_000_000),
    ZeroKnob("allgather_bucket_size", "allgather_bucket_size", 500_000_000),
    ZeroKnob("prefetch_bucket_size", "stage3_prefetch_bucket_size", 50_000_000, min_stage=3),
    ZeroKnob("max_live_parameters", "stage3_max_live_parameters", 1_000_000_000, min_stage=3),
    ZeroKnob("max_reuse_distance", "stage3_max_reuse_distance", 1_000_000_000, min_stage=3),
    ZeroKnob("param_persistence_threshold", "stage3_param_persistence_threshold", 100_000, min_stage=3),
    ZeroKnob("sub_group_size", "sub_group_size", 1_000_000_000, min_stage=3),
)
"""``overlap_comm`` is None in DeepSpeed and resolved by ``overlap_comm_valid``: True for stage 3 only."""

KNOB_BY_NAME: dict[str, ZeroKnob] = {knob.name: knob for knob in ZERO_KNOBS}
MAX_REUSE_DISTANCE = KNOB_BY_NAME["max_reuse_distance"].default
"""``stage3_max_reuse_distance``'s default (DeepSpeed's, tests/test_defaults.py)."""

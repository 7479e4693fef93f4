"""The one setup object: everything that decides per-GPU memory of a DeepSpeed training job.

``TrainingSetup`` is a frozen, keyword-only dataclass made of small parts. Each part validates itself once in
``__post_init__`` and raises ``ValueError`` with a message a user can act on; nothing here is ever mutated.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Literal

from zeroest.estimator.core.defaults import DEEPSPEED_ZERO_DEFAULTS
from zeroest.estimator.core.shape import ModelShape

Dtype = Literal["bf16", "fp16", "fp32"]
OptimizerName = Literal["adamw", "adam", "sgd", "sgd-momentum", "adafactor"]
OptimizerImpl = Literal["fused", "torch", "cpu"]
OffloadDevice = Literal["none", "cpu", "nvme"]
Attention = Literal["sdpa", "flash", "eager"]
ActivationMode = Literal["auto", "traced", "closed-form"]
Mode = Literal["deepspeed", "paper"]

DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4}


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


def _positive(name: str, value: int, flag: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive whole number, got {value!r} (set {flag})")


def _non_negative(name: str, value: int, flag: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a whole number >= 0, got {value!r} (set {flag})")


@dataclass(frozen=True, kw_only=True)
class Parallelism:
    """Data-parallel layout: N_d = gpus_per_node * nodes ranks, one GPU each."""

    gpus_per_node: int = 1
    """GPUs (ranks) on each node (``--gpus``)."""
    nodes: int = 1
    """Nodes (``--nodes``)."""

    def __post_init__(self) -> None:
        _positive("the number of GPUs per node", self.gpus_per_node, "--gpus to 1 or more")
        _positive("the number of nodes", self.nodes, "--nodes to 1 or more")

    @property
    def world_size(self) -> int:
        """N_d, the number of data-parallel ranks."""
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True, kw_only=True)
class Optimizer:
    """Which optimizer, and which implementation DeepSpeed runs."""

    name: OptimizerName = "adamw"
    """adamw/adam: two fp32 states per parameter; sgd-momentum: one; sgd: none; adafactor: factored rows+cols."""
    impl: OptimizerImpl = "fused"
    """fused: DeepSpeed FusedAdam (multi-tensor kernel, no temporaries); torch: ``torch_adam: true`` (torch's
    foreach AdamW, which allocates temporaries the size of a parameter group); cpu: DeepSpeedCPUAdam (offload)."""

    def __post_init__(self) -> None:
        if self.name not in ("adamw", "adam", "sgd", "sgd-momentum", "adafactor"):
            raise ValueError(
                f"unknown optimizer {self.name!r}: use --optimizer adamw, adam, sgd, sgd-momentum or adafactor"
            )
        if self.impl not in ("fused", "torch", "cpu"):
            raise ValueError(
                f"unknown optimizer implementation {self.impl!r}: use --optimizer-impl fused, torch or cpu")

    @property
    def states_per_param(self) -> int:
        """fp32 optimizer-state values kept per parameter (K / 4 in the paper's terms, ignoring master weights).

        Adam/AdamW: exp_avg and exp_avg_sq (torch/optim/adamw.py, deepspeed/ops/adam/fused_adam.py ``step``);
        SGD with momentum: momentum_buffer; plain SGD: none. Adafactor is factored and handled separately.
        """
        return {"adamw": 2, "adam": 2, "sgd-momentum": 1, "sgd": 0, "adafactor": 0}[self.name]


@dataclass(frozen=True, kw_only=True)
class ZeroConfig:
    """The ZeRO section of ds_config.json; defaults are DeepSpeed's own (``estimator.defaults``)."""

    stage: ZeroStage = ZeroStage.DISABLED
    """ZeRO stage 0-3 (``zero_optimization.stage``)."""
    overlap_comm: bool | None = None
    """None means DeepSpeed's default: True for stage 3, False otherwise (config.py ``overlap_comm_valid``)."""
    contiguous_gradients: bool = DEEPSPEED_ZERO_DEFAULTS["contiguous_gradients"]
    """Copy gradients into one contiguous partition buffer as they are reduced (stages 2-3)."""
    reduce_bucket_size: int = DEEPSPEED_ZERO_DEFAULTS["reduce_bucket_size"]
    """Elements per gradient reduce bucket."""
    allgather_bucket_size: int = DEEPSPEED_ZERO_DEFAULTS["allgather_bucket_size"]
    """Elements per parameter all-gather after the step (stages 1-2)."""
    prefetch_bucket_size: int = DEEPSPEED_ZERO_DEFAULTS["prefetch_bucket_size"]
    """Elements stage 3 prefetches ahead of use (``stage3_prefetch_bucket_size``)."""
    max_live_parameters: int = DEEPSPEED_ZERO_DEFAULTS["max_live_parameters"]
    """Most gathered parameters stage 3 keeps at once (``stage3_max_live_parameters``)."""
    param_persistence_threshold: int = DEEPSPEED_ZERO_DEFAULTS["param_persistence_threshold"]
    """Stage 3 keeps parameters with fewer elements than this whole on every rank."""
    sub_group_size: int = DEEPSPEED_ZERO_DEFAULTS["sub_group_size"]
    """Stage 3 optimizer sub-group size in elements (fp32 gradient buffers are made per sub-group)."""
    offload_optimizer: OffloadDevice = "none"
    """Where fp32 master weights and optimizer states live (``offload_optimizer.device``)."""
    offload_params: OffloadDevice = "none"
    """Where stage 3 keeps its 16-bit parameter partitions (``offload_param.device``); stage 3 only."""
    pin_memory: bool = True
    """Offloaded host buffers are page-locked (``offload_*.pin_memory``)."""
    zero_init: bool = False
    """Stage 3: the model is built under ``deepspeed.zero.Init`` (HF Trainer with ZeRO-3, accelerate's
    ``zero3_init_flag``), so it is never whole on one GPU; False: built whole, then partitioned by
    ``deepspeed.initialize``."""

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {self.stage!r} (set --stage)")
        object.__setattr__(self, "stage", ZeroStage(int(self.stage)))
        for name in ("reduce_bucket_size", "allgather_bucket_size"):
            _positive(name.replace("_", " "), getattr(self, name), f"--{name.replace('_', '-')}")
        for name in ("prefetch_bucket_size", "max_live_parameters", "param_persistence_threshold", "sub_group_size"):
            _non_negative(name.replace("_", " "), getattr(self, name), f"--{name.replace('_', '-')}")
        for name in ("offload_optimizer", "offload_params"):
            if getattr(self, name) not in ("none", "cpu", "nvme"):
                raise ValueError(f"--{name.replace('_', '-')} must be none, cpu or nvme, got {getattr(self, name)!r}")
        if self.offload_params != "none" and self.stage < ZeroStage.PARAMETERS:
            raise ValueError(
                f"parameter offload needs ZeRO stage 3, but the stage is {int(self.stage)}: "
                "use --stage 3 or drop --offload-params"
            )
        if self.offload_optimizer == "nvme" and self.stage < ZeroStage.PARAMETERS:
            raise ValueError("optimizer offload to NVMe needs ZeRO stage 3 (ZeRO-Infinity): use --stage 3 or cpu")
        if self.offload_optimizer == "none" and self.offload_params != "none":
            raise ValueError(
                "DeepSpeed offloads parameters only with the optimizer offloaded too: set --offload-optimizer")

    @property
    def overlap(self) -> bool:
        """overlap_comm with DeepSpeed's dynamic default resolved."""
        return self.stage == ZeroStage.PARAMETERS if self.overlap_comm is None else self.overlap_comm


@dataclass(frozen=True, kw_only=True)
class Workload:
    """One micro-step's input and how activations are kept."""

    micro_batch: int = 1
    """Sequences per rank per micro-step (``train_micro_batch_size_per_gpu``)."""
    seq_len: int = 2048
    """Tokens per sequence."""
    grad_accum: int = 1
    """Micro-steps per optimizer step (``gradient_accumulation_steps``)."""
    grad_ckpt: bool = False
    """HF non-reentrant gradient checkpointing: keep layer inputs, recompute one layer at a time."""
    attn: Attention = "sdpa"
    """Attention implementation: sdpa (memory-efficient/flash kernels), flash (flash-attention-2), eager."""
    activations: ActivationMode = "auto"
    """traced (meta-device trace of the real HF model), closed-form, or auto (traced when torch is installed)."""

    def __post_init__(self) -> None:
        _positive("the micro-batch", self.micro_batch, "--micro-batch")
        _positive("the sequence length", self.seq_len, "--seq-len")
        _positive("gradient accumulation", self.grad_accum, "--grad-accum")
        if self.attn not in ("sdpa", "flash", "eager"):
            raise ValueError(f"unknown attention {self.attn!r}: use --attn sdpa, flash or eager")
        if self.activations not in ("auto", "traced", "closed-form"):
            raise ValueError(f"unknown activation mode {self.activations!r}: use traced or closed-form")


@dataclass(frozen=True, kw_only=True)
class TrainingSetup:
    """Everything the estimate depends on. Build it once, validate once, never mutate (use ``with_``)."""

    model: ModelShape
    """The model's shape and parameter tensors."""
    parallel: Parallelism = field(default_factory=Parallelism)
    """Data-parallel ranks N_d."""
    dtype: Dtype = "bf16"
    """Training precision: bf16 or fp16 mixed precision (fp32 master weights), or pure fp32."""
    optimizer: Optimizer = field(default_factory=Optimizer)
    """Optimizer and its implementation."""
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    """ZeRO stage and knobs."""
    workload: Workload = field(default_factory=Workload)
    """Micro-batch, sequence length, accumulation, checkpointing, attention."""
    mode: Mode = "deepspeed"
    """deepspeed: what DeepSpeed really allocates; paper: the ZeRO paper's model states, (2 + 2 + K) Psi."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {self.dtype!r}: use --dtype bf16, fp16 or fp32")
        if self.mode not in ("deepspeed", "paper"):
            raise ValueError(f"unknown mode {self.mode!r}: use deepspeed or paper")
        cpu_adam = self.optimizer.impl == "cpu"
        if cpu_adam != (self.zero.offload_optimizer != "none"):
            if cpu_adam:
                raise ValueError(
                    "--optimizer-impl cpu (DeepSpeedCPUAdam) runs only with --offload-optimizer cpu or nvme")
            raise ValueError("an offloaded optimizer runs DeepSpeedCPUAdam on the host: set --optimizer-impl cpu")
        if cpu_adam and self.optimizer.name not in ("adam", "adamw"):
            raise ValueError(f"optimizer offload needs Adam or AdamW (DeepSpeedCPUAdam), not {self.optimizer.name}")
        if self.optimizer.impl == "fused" and self.optimizer.name not in ("adam", "adamw"):
            raise ValueError(f"--optimizer-impl fused is FusedAdam; {self.optimizer.name} needs --optimizer-impl torch")

    @property
    def world_size(self) -> int:
        """N_d."""
        return self.parallel.world_size

    @property
    def stage(self) -> ZeroStage:
        """The ZeRO stage."""
        return self.zero.stage

    def with_(self, **changes) -> TrainingSetup:
        """A copy with top-level fields replaced; nested parts are replaced whole: ``with_(zero=...)``."""
        return replace(self, **changes)

    def with_stage(self, stage: int) -> TrainingSetup:
        """The same setup at another ZeRO stage (param offload dropped below stage 3)."""
        zero = self.zero
        if stage < ZeroStage.PARAMETERS and zero.offload_params != "none":
            zero = replace(zero, offload_params="none")
        if stage < ZeroStage.PARAMETERS and zero.offload_optimizer == "nvme":
            zero = replace(zero, offload_optimizer="cpu")
        return replace(self, zero=replace(zero, stage=ZeroStage(stage)))

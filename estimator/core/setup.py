"""The one setup object: everything that decides per-GPU memory of a DeepSpeed training job.

``TrainingSetup`` is a frozen, keyword-only dataclass made of small parts. Each part validates itself once in
``__post_init__`` and raises ``ValueError`` with a message a user can act on; nothing here is ever mutated.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from zeroest.estimator.core.adapters import Adapters, trainable_split
from zeroest.estimator.core.shape import ModelShape
from zeroest.estimator.core.vocab import (
    CPU_OPTIMIZERS,
    DTYPE_BYTES,
    EIGHT_BIT,
    FUSED_KERNELS,
    KNOB_BY_NAME,
    LOOP_RULE,
    PARAM_GROUPS_RULE,
    ZERO_INIT_RULE,
    ActivationMode,
    Attention,
    Dtype,
    Loop,
    Mode,
    OffloadDevice,
    OptimizerImpl,
    OptimizerName,
    ZeroStage,
    check_offload,
    choice,
    default_optimizer_impl,
)

__all__ = ["DTYPE_BYTES", "MAX_PARAMS", "Optimizer", "Parallelism", "TrainingSetup", "Workload", "ZeroConfig",
           "ZeroStage"]


def axis(default, flag: str, help: str, *, key: str | None = None, count: bool = False):
    """A setup field that is also a command-line flag and a key of the flat setup dict.

    ``flag`` and ``help`` are what ``predict`` and ``plan`` show; ``key`` is the flat dict's and the CLI
    parameter's name (the field's own name unless given); ``count`` marks element counts typed as ``5e8`` or
    ``500M``. ``zeroest.cli.options`` and ``configs.flat`` read these, so a new field here is a new flag and key.
    """
    return field(default=default, metadata={"flag": flag, "help": help, "key": key, "count": count})


def _positive(name: str, value: int, flag: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive whole number, got {value!r} (set {flag})")


def _non_negative(name: str, value: int, flag: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a whole number >= 0, got {value!r} (set {flag})")


MAX_PARAMS = 10**15
"""The most parameters (as trained: the model's own, LoRA's and modules_to_save copies) zeroest estimates, a
thousand times GPT-3's largest; past it a standard shape's layer count and width run far outside GPT-3's table, and
per-group lists (``stage3.stage3_states``'s sub-groups) no longer fit in memory."""
MAX_TOKENS = 10**12
"""The most tokens in one rank's micro-batch (micro-batch x sequence length) zeroest estimates: petabytes of
activations, far past any card; beyond it the byte counts overflow floats."""
MAX_WORLD_SIZE = 100_000
"""The most data-parallel ranks zeroest estimates: beyond any published training job, and past it the walk over
each rank's slice of the stage 1-2 flat group (``flat_group.stage1_partition_copy_bytes``) takes minutes."""


def _set(obj, name: str, value) -> None:
    object.__setattr__(obj, name, value)


@dataclass(frozen=True, kw_only=True)
class Parallelism:
    """Data-parallel layout: N_d = gpus_per_node * nodes ranks, one GPU each."""

    gpus_per_node: int = axis(1, "--gpus", "GPUs (data-parallel ranks) per node.", key="gpus_per_node")
    """GPUs (ranks) on each node."""
    nodes: int = axis(1, "--nodes", "Nodes.")
    """Nodes."""

    def __post_init__(self) -> None:
        _positive("the number of GPUs per node", self.gpus_per_node, "--gpus to 1 or more")
        _positive("the number of nodes", self.nodes, "--nodes to 1 or more")
        if self.world_size > MAX_WORLD_SIZE:
            raise ValueError(f"{self.gpus_per_node} GPUs per node x {self.nodes} nodes = {self.world_size:,} ranks is "
                             f"beyond what zeroest estimates (at most {MAX_WORLD_SIZE:,}): lower --gpus or --nodes")

    @property
    def world_size(self) -> int:
        """N_d, the number of data-parallel ranks."""
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True, kw_only=True)
class Optimizer:
    """Which optimizer, and which implementation DeepSpeed runs."""

    name: OptimizerName = axis(OptimizerName.ADAMW, "--optimizer", "Optimizer: adamw/adam (2 fp32 states), "
                               "sgd-momentum and lion (1), sgd (0), adafactor (factored on matrices, full on ZeRO's "
                               "1-D partitions), adamw-8bit and paged-adamw-8bit (bitsandbytes, uint8 states), muon "
                               "(DeepSpeed's Muon with auxiliary Adam).", key="optimizer")
    """The optimizer (``vocab.OptimizerName``); its states per stage are ``core.optimizers``'."""
    impl: OptimizerImpl | None = axis(
        None, "--optimizer-impl", "fused: DeepSpeed's FusedAdam/FusedLion (Muon's auxiliary Adam); torch: torch_adam "
        "(foreach AdamW) or torch.optim; cpu: DeepSpeedCPUAdam/CPULion; bnb: bitsandbytes. Default: cpu with "
        "optimizer offload, bnb for the 8-bit ones, fused for Adam/AdamW/Lion/Muon, torch otherwise.",
        key="optimizer_impl")
    """fused: DeepSpeed's fused kernels (FusedAdam, FusedLion; no temporaries); torch: ``torch_adam: true`` (torch's
    foreach AdamW, which allocates temporaries the size of a parameter group) or a ``torch.optim`` optimizer; cpu:
    DeepSpeedCPUAdam/DeepSpeedCPULion (offload); bnb: a bitsandbytes client optimizer.
    None: ``vocab.default_optimizer_impl``, resolved by ``TrainingSetup``."""
    param_groups: int = axis(2, "--param-groups", "Parameter groups of the optimizer (2: weight decay and none); "
                             + PARAM_GROUPS_RULE + ".")
    """Parameter groups DeepSpeed's ZeRO optimizer flattens one by one: at stage 2 every group's 16-bit gradients
    share one buffer, alive through the step of every group but the last (``model_states.stage12_states``).
    ``vocab.param_groups_default`` is the rule."""

    def __post_init__(self) -> None:
        _positive("the number of parameter groups", self.param_groups, "--param-groups to 1 or more")
        _set(self, "name", choice(OptimizerName, self.name, "--optimizer"))
        if self.impl is not None:
            _set(self, "impl", choice(OptimizerImpl, self.impl, "--optimizer-impl"))

    @property
    def states_per_param(self) -> int:
        """fp32 optimizer-state values kept per parameter (K / 4 in the paper's terms, ignoring master weights).

        Adam/AdamW: exp_avg and exp_avg_sq (torch/optim/adamw.py, deepspeed/ops/adam/fused_adam.py ``step``);
        SGD with momentum and Lion: one; plain SGD: none; Muon: at most Adam's two. Adafactor and the 8-bit
        optimizers keep less than one fp32 value per parameter (0 here): ``core.optimizers`` sizes every state.
        """
        return {"adamw": 2, "adam": 2, "sgd-momentum": 1, "lion": 1, "muon": 2}.get(self.name, 0)


def _knob(name: str, help: str):
    knob = KNOB_BY_NAME[name]
    if knob.kind is bool:
        return axis(knob.default, f"--{name.replace('_', '-')}/--no-{name.replace('_', '-')}", help)
    return axis(knob.default, f"--{name.replace('_', '-')}", f"{help} Elements, e.g. 5e8 or 500M.", count=True)


@dataclass(frozen=True, kw_only=True)
class ZeroConfig:
    """The ZeRO section of ds_config.json; defaults are DeepSpeed's own (``vocab.ZERO_KNOBS``)."""

    stage: ZeroStage = axis(ZeroStage.DISABLED, "--stage", "ZeRO stage 0-3.")
    """ZeRO stage 0-3 (``zero_optimization.stage``)."""
    overlap_comm: bool | None = _knob("overlap_comm", "Overlap reduction with backward (DeepSpeed's default: on "
                                      "for stage 3 only).")
    """None means DeepSpeed's default: True for stage 3, False otherwise (config.py ``overlap_comm_valid``)."""
    contiguous_gradients: bool = _knob("contiguous_gradients", "Copy gradients into one contiguous buffer as "
                                       "they are reduced (stages 2-3).")
    """Copy gradients into one contiguous partition buffer as they are reduced (stages 2-3)."""
    reduce_bucket_size: int = _knob("reduce_bucket_size", "Gradient reduce bucket.")
    """Elements per gradient reduce bucket."""
    allgather_bucket_size: int = _knob("allgather_bucket_size", "Parameter all-gather bucket after the step "
                                       "(stages 1-2).")
    """Elements per parameter all-gather after the step (stages 1-2)."""
    prefetch_bucket_size: int = _knob("prefetch_bucket_size", "Stage 3 prefetch (stage3_prefetch_bucket_size).")
    """Elements stage 3 prefetches ahead of use (``stage3_prefetch_bucket_size``)."""
    max_live_parameters: int = _knob("max_live_parameters", "Most gathered parameters stage 3 keeps "
                                     "(stage3_max_live_parameters).")
    """Most gathered parameters stage 3 keeps at once (``stage3_max_live_parameters``)."""
    max_reuse_distance: int = _knob("max_reuse_distance", "Stage 3 keeps a gathered parameter whose next use is "
                                    "this close (stage3_max_reuse_distance).")
    """Stage 3 keeps a parameter gathered when its next use is within this many elements of fetches
    (``stage3_max_reuse_distance``; ``stage3_fetch.reuse_retained_numel``)."""
    param_persistence_threshold: int = _knob("param_persistence_threshold", "Stage 3 keeps smaller parameters "
                                             "whole on every rank (stage3_param_persistence_threshold).")
    """Stage 3 keeps parameters with fewer elements than this whole on every rank."""
    sub_group_size: int = _knob("sub_group_size", "Stage 3 optimizer sub-group.")
    """Stage 3 optimizer sub-group size in elements (fp32 gradient buffers are made per sub-group)."""
    offload_optimizer: OffloadDevice = axis(OffloadDevice.NONE, "--offload-optimizer",
                                            "Where master weights and optimizer states live.")
    """Where fp32 master weights and optimizer states live (``offload_optimizer.device``)."""
    offload_params: OffloadDevice = axis(OffloadDevice.NONE, "--offload-params",
                                         "Where stage 3 keeps its parameter partitions.")
    """Where stage 3 keeps its 16-bit parameter partitions (``offload_param.device``); stage 3 only."""
    pin_memory: bool = axis(True, "--pin-memory/--no-pin-memory", "Offloaded host buffers are page-locked.")
    """Offloaded host buffers are page-locked (``offload_*.pin_memory``)."""
    zero_init: bool = axis(False, "--zero-init/--no-zero-init", "Stage 3: the model is built under "
                           "deepspeed.zero.Init, so it is never whole on one GPU; " + ZERO_INIT_RULE + ".")
    """Stage 3: the model is built under ``deepspeed.zero.Init`` (HF Trainer with ZeRO-3, accelerate's
    ``zero3_init_flag``), so it is never whole on one GPU; False: built whole, then partitioned by
    ``deepspeed.initialize``. Below stage 3 it changes nothing. ``vocab.zero_init_default`` is the rule."""

    def __post_init__(self) -> None:
        if isinstance(self.stage, bool) or self.stage not in (0, 1, 2, 3):
            raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {self.stage!r} (set --stage)")
        _set(self, "stage", ZeroStage(int(self.stage)))
        for name in ("reduce_bucket_size", "allgather_bucket_size"):
            _positive(name.replace("_", " "), getattr(self, name), f"--{name.replace('_', '-')}")
        for name in ("prefetch_bucket_size", "max_live_parameters", "max_reuse_distance", "param_persistence_threshold",
                     "sub_group_size"):
            _non_negative(name.replace("_", " "), getattr(self, name), f"--{name.replace('_', '-')}")
        for name in ("offload_optimizer", "offload_params"):
            _set(self, name, choice(OffloadDevice, getattr(self, name), f"--{name.replace('_', '-')}"))
        check_offload(self.stage, self.offload_optimizer, self.offload_params)

    @property
    def overlap(self) -> bool:
        """overlap_comm with DeepSpeed's dynamic default resolved."""
        return self.stage == ZeroStage.PARAMETERS if self.overlap_comm is None else self.overlap_comm

    @property
    def builds_partitioned(self) -> bool:
        """The model is partitioned as it is built: stage 3 under zero.Init."""
        return self.stage == ZeroStage.PARAMETERS and self.zero_init


@dataclass(frozen=True, kw_only=True)
class Workload:
    """One micro-step's input and how activations are kept."""

    micro_batch: int = axis(1, "--micro-batch", "Sequences per GPU per micro-step.")
    """Sequences per rank per micro-step (``train_micro_batch_size_per_gpu``)."""
    seq_len: int = axis(2048, "--seq-len", "Tokens per sequence.")
    """Tokens per sequence."""
    grad_accum: int = axis(1, "--grad-accum", "Gradient accumulation steps.")
    """Micro-steps per optimizer step (``gradient_accumulation_steps``)."""
    grad_ckpt: bool = axis(False, "--grad-ckpt/--no-grad-ckpt", "HF non-reentrant gradient checkpointing.")
    """HF non-reentrant gradient checkpointing: keep layer inputs, recompute one layer at a time."""
    attn: Attention = axis(Attention.SDPA, "--attn", "Attention implementation.")
    """Attention implementation: sdpa (memory-efficient/flash kernels), flash (flash-attention-2), eager."""
    activations: ActivationMode = axis(ActivationMode.AUTO, "--activations", "traced (meta-device trace of the HF "
                                       "model; needs torch and transformers), closed-form, or auto (traced when "
                                       "possible; closed-form for --params).")
    """traced (meta-device trace of the real HF model), closed-form, or auto (traced when torch is installed)."""
    loop: Loop = axis(Loop.CUSTOM, "--loop", "What the training loop keeps of the model's output: trainer (only "
                      "the loss), custom (outputs reassigned each micro-step), custom-del (outputs deleted after "
                      "the step); " + LOOP_RULE + ".")
    """How long the output object (its logits) lives: ``vocab.Loop``; ``vocab.loop_default`` is the rule."""

    def __post_init__(self) -> None:
        _positive("the micro-batch", self.micro_batch, "--micro-batch")
        _positive("the sequence length", self.seq_len, "--seq-len")
        _positive("gradient accumulation", self.grad_accum, "--grad-accum")
        if self.micro_batch * self.seq_len > MAX_TOKENS:
            short = [str(n) if n < 10**15 else f"{n:.3g}" for n in (self.micro_batch, self.seq_len)]
            raise ValueError(f"micro-batch {short[0]} x sequence length {short[1]} is beyond the "
                             f"{MAX_TOKENS:.0e} tokens per micro-batch zeroest estimates: lower --micro-batch or "
                             "--seq-len")
        _set(self, "attn", choice(Attention, self.attn, "--attn"))
        _set(self, "activations", choice(ActivationMode, self.activations, "--activations"))
        _set(self, "loop", choice(Loop, self.loop, "--loop"))


def _check_impl(opt: Optimizer) -> None:
    """ValueError unless ``opt.impl`` is an implementation DeepSpeed or the user can run for ``opt.name``."""
    if opt.impl == OptimizerImpl.FUSED and opt.name not in FUSED_KERNELS:
        raise ValueError(f"--optimizer-impl fused is DeepSpeed's FusedAdam/FusedLion; {opt.name} needs "
                         f"--optimizer-impl {default_optimizer_impl(opt.name, OffloadDevice.NONE)} (or leave it out)")
    if (opt.name in EIGHT_BIT) != (opt.impl == OptimizerImpl.BNB):
        raise ValueError(f"--optimizer-impl bnb is bitsandbytes' 8-bit AdamW and nothing else: {opt.name} needs "
                         f"--optimizer-impl {default_optimizer_impl(opt.name, OffloadDevice.NONE)} (or leave it out)")
    if opt.impl == OptimizerImpl.TORCH and opt.name == OptimizerName.LION:
        raise ValueError("torch.optim has no Lion: use --optimizer-impl fused (DeepSpeed's FusedLion) or leave it out")
    if opt.impl == OptimizerImpl.CPU and opt.name not in CPU_OPTIMIZERS:
        raise ValueError(f"--optimizer-impl cpu is DeepSpeedCPUAdam/DeepSpeedCPULion, not {opt.name}")


@dataclass(frozen=True, kw_only=True)
class TrainingSetup:
    """Everything the estimate depends on. Build it once, validate once, never mutate (use ``with_``)."""

    model: ModelShape
    """The model's shape and parameter tensors."""
    parallel: Parallelism = field(default_factory=Parallelism)
    """Data-parallel ranks N_d."""
    dtype: Dtype = axis(Dtype.BF16, "--dtype", "Training precision.")
    """Training precision: bf16 or fp16 mixed precision (fp32 master weights), or pure fp32."""
    optimizer: Optimizer = field(default_factory=Optimizer)
    """Optimizer and its implementation."""
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    """ZeRO stage and knobs."""
    workload: Workload = field(default_factory=Workload)
    """Micro-batch, sequence length, accumulation, checkpointing, attention."""
    adapters: Adapters = field(default_factory=Adapters)
    """LoRA adapters and frozen weights (``core.adapters``); the default trains every parameter."""
    mode: Mode = axis(Mode.DEEPSPEED, "--mode", "deepspeed: what DeepSpeed allocates; paper: the ZeRO paper's "
                      "model states.")
    """deepspeed: what DeepSpeed really allocates; paper: the ZeRO paper's model states, (2 + 2 + K) Psi."""
    gpu_memory_bytes: int | None = axis(None, "--gpu", "The card's total memory: DeepSpeed's stage 1-2 init "
                                        "flattens on the host when the card lacks room. Default: unknown, the "
                                        "larger (on-GPU) branch is assumed.")
    """Total memory of each rank's card (bytes, what the driver reports); ``predict``/``plan`` fill it from
    ``--gpu`` (``catalog.gpus.parse_gpu``), grids from a preset or size. DeepSpeed's capacity decisions
    (``core.capacity``) follow it; None: an unknown card, assumed large (the branch that holds more)."""
    expandable_segments: bool = axis(False, "--expandable-segments/--no-expandable-segments",
                                     "The job runs with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (the "
                                     "allocator maps pages into one growing segment per stream, so freed blocks "
                                     "fragment less). Default: off, torch's default and the larger reserve.")
    """torch's caching allocator maps memory into expandable segments (``PYTORCH_CUDA_ALLOC_CONF`` or
    ``PYTORCH_ALLOC_CONF`` ``expandable_segments:True``; c10/cuda/CUDACachingAllocator.cpp
    ``try_allocate_expandable_block``) instead of one cudaMalloc'd segment per request that found no free block.
    Only the reserved memory depends on it (``core.reserved``); False, the default, is torch's own default."""

    def __post_init__(self) -> None:
        if self.gpu_memory_bytes is not None:
            _positive("the card's memory", self.gpu_memory_bytes, "--gpu to a preset or a size such as 24GB")
        _set(self, "dtype", choice(Dtype, self.dtype, "--dtype"))
        _set(self, "mode", choice(Mode, self.mode, "--mode"))
        if not self.adapters.full:
            trainable_split(self.model, self.adapters)  # raises when --lora-targets or --freeze match nothing
        if self.workload.attn == Attention.FLASH and self.dtype == Dtype.FP32:
            raise ValueError("--attn flash runs in fp16 or bf16 only (flash-attn stops at the first forward in "
                             "fp32): use --attn sdpa, or --dtype bf16")
        opt, zero = self.optimizer, self.zero
        check_offload(zero.stage, zero.offload_optimizer, zero.offload_params, opt.name)
        if opt.impl is None:
            _set(self, "optimizer", replace(opt, impl=default_optimizer_impl(opt.name, zero.offload_optimizer)))
            opt = self.optimizer
        offloaded = zero.offload_optimizer != OffloadDevice.NONE
        if opt.impl == OptimizerImpl.CPU and not offloaded:
            raise ValueError("--optimizer-impl cpu (DeepSpeedCPUAdam) runs only with --offload-optimizer cpu or nvme")
        if offloaded and opt.impl != OptimizerImpl.CPU:
            raise ValueError("an offloaded optimizer runs DeepSpeedCPUAdam on the host: set --optimizer-impl cpu "
                             "or leave it out")
        _check_impl(opt)


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
        """The same setup at another ZeRO stage (offload the stage does not accept is dropped, and the optimizer
        implementation follows the offload)."""
        zero = self.zero
        if stage < ZeroStage.PARAMETERS and zero.offload_params != OffloadDevice.NONE:
            zero = replace(zero, offload_params=OffloadDevice.NONE)
        if stage < ZeroStage.PARAMETERS and zero.offload_optimizer == OffloadDevice.NVME:
            zero = replace(zero, offload_optimizer=OffloadDevice.CPU)
        if stage < ZeroStage.OPTIMIZER_STATES:
            zero = replace(zero, offload_optimizer=OffloadDevice.NONE)
        optimizer = self.optimizer
        if (zero.offload_optimizer != OffloadDevice.NONE) != (optimizer.impl == OptimizerImpl.CPU):
            optimizer = replace(optimizer, impl=default_optimizer_impl(optimizer.name, zero.offload_optimizer))
        return replace(self, zero=replace(zero, stage=ZeroStage(stage)), optimizer=optimizer)

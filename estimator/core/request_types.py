"""The request sequence's own types (pure): what of a setup it depends on (``RequestSpec``), the model's tensors
(``TensorSpec``) and the requests in order (``Sequence``), which ``core.requests`` and ``core.zero12_requests``
write and ``core.allocator.replay`` replays; at stage 3 the modules its hooks gather for (``ModuleSpec``)."""

from __future__ import annotations

from dataclasses import dataclass, field

STEPS = 3
"""Optimizer steps the sequence runs: the reserve of every recorded run stopped growing by the third."""


@dataclass(frozen=True, kw_only=True)
class RequestSpec:
    """What of the setup the sequence depends on beyond the model and its trace."""

    stage: int
    world: int
    """N: the ranks the partitions are cut for."""
    offload: bool
    """``offload_optimizer`` to the host."""
    loop: str
    """custom (the returned logits kept until the next forward returns), custom-del (until the micro-step's end) or
    trainer (only the loss)."""
    param_groups: int
    """1, or 2: weight decay, then biases and norms (``validate.adapters.parameter_groups``)."""
    bucket_elements: int
    """``reduce_bucket_size``."""
    flatten_on_cpu: bool = False
    """The first group's flatten goes through the host (``core.capacity.flatten_decision``)."""
    optimizer: str = "adamw-torch"
    """The update the step runs on each group's flat fp32 partition (``core.zero12_requests.UPDATES``):
    adamw-torch, adamw-fused, lion, sgd, sgd-momentum or adafactor."""
    steps: int = STEPS
    grad_accum: int = 1
    """Micro-steps per optimizer step (``gradient_accumulation_steps``; module docstring)."""
    overlap: bool = False
    """``overlap_comm``: two ipg buffers, and the reduction's requests on its own stream (module docstring)."""
    prefetch_elements: int = 50_000_000
    """Stage 3: ``stage3_prefetch_bucket_size``."""
    persistence_threshold: int = 100_000
    """Stage 3: ``stage3_param_persistence_threshold``, parameters of at most this many elements stay gathered."""
    max_live: int = 1_000_000_000
    """Stage 3: ``stage3_max_live_parameters``."""
    reuse_distance: int = 1_000_000_000
    """Stage 3: ``stage3_max_reuse_distance``."""
    sub_group_size: int = 1_000_000_000
    """Stage 3: ``sub_group_size``."""
    zero_init: bool = False
    """Stage 3: the model built under ``deepspeed.zero.Init`` (``core.zero3_requests``)."""
    fp16: bool = False
    """The 16-bit type is fp16: stage 3's step checks the gradient partitions for overflow first
    (``core.zero3_requests``); bf16 checks nothing."""


@dataclass(frozen=True)
class TensorSpec:
    """One parameter of the model as trained: its name, elements, bytes per element and whether it trains."""

    name: str
    numel: int
    element_size: int
    trainable: bool


@dataclass(frozen=True)
class ModuleSpec:
    """One module of the model as ZeRO-3 hooks it: its mark key (``trace.zero3_hooks.module_marks``: prefix and
    index), its name and the names of the parameters its hooks gather (its own; a leaf module's, all below it)."""

    key: str
    name: str
    params: tuple[str, ...]
    own: tuple[str, ...] = ()
    """Its own parameters (``parameters(recurse=False)``), as the trace's marks of saved views number them."""
    hooked: bool = True
    """False inside a leaf module: DeepSpeed installs no hooks there (parameter_offload.py
    ``_register_deepspeed_module``)."""
    leaf: bool = False
    """A ZeRO-3 leaf module (``trace.zero3_hooks.LEAF_CLASSES``): its gradients are reduced together by its backward
    hook (stage3.py ``reduce_leaf_module_grads``)."""


@dataclass
class Sequence:
    """Requests in order: ``("a", key, bytes)`` (``("a", key, bytes, stream)`` off the default stream), ``("f", key)``,
    ``("empty",)``, ``("mark", name)``."""

    ops: list[tuple] = field(default_factory=list)
    live: set = field(default_factory=set)

    def alloc(self, key, size: int, stream: int = 0) -> None:
        self.ops.append(("a", key, int(size)) if not stream else ("a", key, int(size), stream))
        self.live.add(key)

    def free(self, key) -> None:
        if key in self.live:
            self.live.discard(key)
            self.ops.append(("f", key))

    def temp(self, key, size: int, stream: int = 0) -> None:
        self.alloc(key, size, stream)
        self.free(key)

    def empty_cache(self) -> None:
        """DeepSpeed's runtime/utils.py ``empty_cache``: segments given back, the peak statistics restarted."""
        self.ops.append(("empty",))

    def mark(self, name: str) -> None:
        self.ops.append(("mark", name))

"""The caching allocator's requests of a ZeRO-1/2 run, in order, and the reserve they leave (pure; no torch).

Torch's default caching allocator reserves a function of the request sequence alone: fed a run's recorded requests,
``core.allocator.CachingAllocatorModel`` gives its peak reserve to the byte (benchmarks/allocator_replay.py,
data/runs/h200-sequences). ``build`` writes that sequence from the model's tensors, a traced forward and backward
(``trace.requests`` traces it on the meta device) and DeepSpeed 0.19.8's source, for rank 0 of ``world`` ranks
(b the 16-bit width, P_g a group's trainable parameters, N the ranks):

* the model on the GPU: every parameter and buffer in ``named_parameters`` order (engine.py
  ``_configure_distributed_model``, ``module.to``);
* ``DeepSpeedZeroOptimizer.__init__`` (runtime/zero/stage_1_and_2.py), group by group: ``empty_cache()``
  (segments given back, the peak statistics restarted), the flat copy of the group (``flatten_dense_tensors_aligned``,
  b P_g) and its original tensors freed (``_update_model_bit16_weights``), the partition's ``.clone().to(fp32)``
  (b P_g/N, then 4 P_g/N, or none with optimizer offload, where it goes to the host; the clone freed); where the
  card's free memory is short of the flat buffer (``core.capacity``), the group's tensors leave for the host first,
  another ``empty_cache()`` follows and the flat buffer comes back as one block; then with offload
  ``temp_grad_buffer_for_gpu_offload`` (b n_max, kept), without it ``initialize_optimizer_states``' zero fp32
  gradient per group (4 P_g/N, made and dropped);
* each micro-step: cuBLAS's workspace (``CUBLAS_WORKSPACE_BYTES``) at the first GEMM of the first forward (at the
  latest right after the first request over 1 MiB, the embeddings' output: transformers 5.17's rotary embedding runs a
  matmul there) and of the first backward (autograd's thread has its own handle), both kept; the traced forward and
  backward; the custom loop keeps the logits the model returns (gemma-2's softcapped ones, not the head's) until the
  next forward returns, the trainer loop only the loss. At the first parameter gradient the ipg bucket
  (``setup_buckets``, b ``reduce_bucket_size``). At stage 2 each final gradient is copied into the bucket and its own
  storage dropped at its hook (``reduce_independent_p_g_buckets_and_remove_grads``), which ``AccumulateGrad`` runs
  once the node that made the gradient has freed what it frees (a tied weight's two parts, summed). A gradient that
  would overflow the bucket first flushes it (``reduce_ipg_grads``): the flatten of its tensors (``allreduce_bucket``,
  b E) only where they make two slices or more (``average_tensor`` merges consecutive parameters bound for one rank,
  whatever their group); then for each of its parameters in the rank's partition, without offload the copy into
  ``grads_in_partition`` (made at the first flush: b times the elements of every parameter that starts in the
  partition, ``copy_grads_in_partition``), with offload the fp64 copy for its norm
  (``set_norm_for_param_grad_in_gpu``, 8 n) and the fp32 copy for the host
  (``async_inplace_copy_grad_to_fp32_buffer_from_gpu``, 4 n), each made and dropped. The last flush comes at the end
  of backward, then the bucket is released (``_release_ipg_buffers``). Stage 1 keeps every gradient until backward
  ends, then sends them through the bucket in the groups' order (``reduce_gradients``);
* with gradient accumulation (engine.py ``allreduce_gradients``): stage 2 reduces every micro-step. The first
  micro-step's ``grads_in_partition`` lives until the step; each later one makes its own at its first flush
  (``_release_ipg_buffers`` let the previous go), adds it into the first's tensors
  (``independent_gradient_partition_epilogue``: ``all_grad_tensors``, ``add_``) and drops it as its backward ends.
  Stage 1 reduces at the boundary only: the first micro-step's gradients are held, ``AccumulateGrad`` adds each
  later one into them in place (freed as it is made), and the bucket stays from the first gradient to the boundary.
  With offload the partition's fp64 and fp32 copies are made at the boundary only; before it
  (``async_accumulate_grad_in_cpu_via_gpu``) the gradients are added into host buffers through the kept GPU buffer;
* ``step`` without offload: the fp64 norm of each gradient in the partition (``get_grad_norm_direct``, 8 n each,
  made and dropped); then per group the flat 16-bit gradient partition (b P_g/N) and its fp32 copy (4 P_g/N, the
  first dropped); ``grads_in_partition`` dropped with the last group's ``averaged_gradients``; Adam's ``exp_avg``
  and ``exp_avg_sq`` at the first step (4 P_g/N each, kept) and, for torch's AdamW (not FusedAdam), one temporary of
  4 P_g/N; then the fp32 gradient dropped. With offload the step runs on the host.

Left out: requests under 1 MiB that DeepSpeed makes (scalars, NCCL's), kernel workspaces other than cuBLAS's, and
what a real NCCL group's streams hold back (``record_stream``): the sequence was held only against rank 0 of jobs on
a fake process group. ``sequence_gap`` says which setups it covers. Measured: docs/DEVICE_RUNS.md, ninth and tenth
sessions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from zeroest.estimator.core.flat_group import flat_group_numel
from zeroest.estimator.core.vocab import weight_decays

if TYPE_CHECKING:
    from zeroest.estimator.core.setup import TrainingSetup
    from zeroest.estimator.trace.polys import Trace

MiB = 2**20
CUBLAS_WORKSPACE_BYTES = 32 * MiB
"""cuBLAS's workspace on a Hopper card, allocated through the caching allocator at a handle's first GEMM and kept:
one at the first forward's first matmul and one at the first backward's (all eighteen recordings of
data/runs/h200-sequences)."""
BF16 = 2
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
    """custom (the returned logits kept until the next forward returns) or trainer (only the loss)."""
    param_groups: int
    """1, or 2: weight decay, then biases and norms (``validate.adapters.parameter_groups``)."""
    bucket_elements: int
    """``reduce_bucket_size``."""
    flatten_on_cpu: bool = False
    """The first group's flatten goes through the host (``core.capacity.flatten_decision``)."""
    adam_temporary: bool = True
    """torch's AdamW takes its foreach path on CUDA, one fp32 temporary of 4 P_g/N per group
    (``core.optimizers.optimizer_temp_bytes``); FusedAdam updates in place."""
    steps: int = STEPS
    grad_accum: int = 1
    """Micro-steps per optimizer step (``gradient_accumulation_steps``; module docstring)."""


@dataclass(frozen=True)
class TensorSpec:
    """One parameter of the model as trained: its name, elements, bytes per element and whether it trains."""

    name: str
    numel: int
    element_size: int
    trainable: bool


@dataclass
class Sequence:
    """Requests in order: ``("a", key, bytes)``, ``("f", key)``, ``("empty",)``, ``("mark", name)``."""

    ops: list[tuple] = field(default_factory=list)
    live: set = field(default_factory=set)

    def alloc(self, key, size: int) -> None:
        self.ops.append(("a", key, int(size)))
        self.live.add(key)

    def free(self, key) -> None:
        if key in self.live:
            self.live.discard(key)
            self.ops.append(("f", key))

    def temp(self, key, size: int) -> None:
        self.alloc(key, size)
        self.free(key)

    def empty_cache(self) -> None:
        """DeepSpeed's runtime/utils.py ``empty_cache``: segments given back, the peak statistics restarted."""
        self.ops.append(("empty",))

    def mark(self, name: str) -> None:
        self.ops.append(("mark", name))


def sequence_gap(setup: TrainingSetup) -> str | None:
    """Why ``build`` does not cover the setup, or None where it does: ZeRO stage 1 or 2 (either kind of segment),
    with or without gradient accumulation, AdamW from torch or FusedAdam (DeepSpeedCPUAdam with optimizer offload),
    bf16, the custom or trainer loop, ``overlap_comm`` off and ``contiguous_gradients`` on, full fine-tuning or LoRA
    on all linear layers, one or two parameter groups."""
    z, a, w = setup.zero, setup.adapters, setup.workload
    checks = (
        (int(setup.stage) not in (1, 2), "ZeRO stage 0 or 3"),
        (str(setup.optimizer.name) != "adamw" or str(setup.optimizer.impl) not in ("torch", "fused", "cpu")
         or (str(setup.optimizer.impl) == "cpu") != (str(z.offload_optimizer) != "none"),
         f"optimizer {setup.optimizer.name} ({setup.optimizer.impl})"),
        (str(setup.dtype) != "bf16", f"{setup.dtype} training"),
        (str(w.loop) not in ("custom", "trainer"), f"the {w.loop} loop"),
        (z.overlap or not z.contiguous_gradients, "overlap_comm on or contiguous_gradients off"),
        (bool(a.lora_rank) and str(a.lora_targets) != "all-linear", "LoRA on chosen modules"),
        (bool(a.freeze or a.modules_to_save) or str(a.base_quant) != "none", "frozen weights or a quantised base"),
        (setup.optimizer.param_groups not in (1, 2), "more than two parameter groups"),
    )
    return next((why for failed, why in checks if failed), None)


def _groups(tensors: list[TensorSpec], param_groups: int) -> list[list[tuple[str, int]]]:
    """The optimizer's parameter groups: one, or weight decay then biases and norms (validate/adapters.py
    ``parameter_groups``, as the HF Trainer groups them)."""
    named = [t for t in tensors if t.trainable]
    if param_groups == 2:
        groups = [[t for t in named if weight_decays(t.name)], [t for t in named if not weight_decays(t.name)]]
    else:
        groups = [named]
    return [[(t.name, t.numel) for t in group] for group in groups if group]


class Bucket:
    """The ipg bucket's flushes in one backward: the requests each flush makes. ``layout``: parameter -> (group,
    first element in the group's flat buffer, elements); ``parts``: each group's partition size; ``in_partition``:
    the elements of each parameter inside the rank's partition; ``touching``: the elements of every parameter that
    starts in it (``grads_in_partition``)."""

    def __init__(self, seq: Sequence, step: int, spec: RequestSpec, layout: dict[str, tuple[int, int, int]],
                 parts: list[int], in_partition: dict[str, int], touching: int, partition_key: tuple) -> None:
        self.seq, self.step, self.spec, self.partition_key = seq, step, spec, partition_key
        self.layout, self.parts, self.in_partition, self.touching = layout, parts, in_partition, touching
        self.names: list[str] = []
        self.elements = 0
        self.made = False
        self.boundary = True
        """The micro-step ends the accumulation: only there does offload copy the partition out (fp64 norm, fp32);
        before it ``async_accumulate_grad_in_cpu_via_gpu`` adds into host buffers through the kept GPU buffer."""

    def add(self, name: str, numel: int) -> None:
        if self.elements + numel > self.spec.bucket_elements:
            self.flush()
        self.names.append(name)
        self.elements += numel

    def _slices(self) -> int:
        """The slices ``average_tensor`` reduces: each parameter's piece per partition it touches, the pieces of
        consecutive parameters bound for the same rank being one slice, whatever their group (its
        ``rank_and_offsets`` merge compares the partition id, the process group and the copy ranks)."""
        keys: list[int] = []
        for name in self.names:
            group, start, numel = self.layout.get(name, (0, 0, 0))
            part = max(1, self.parts[group]) if self.parts else 1
            for dst in range(start // part, (start + max(numel, 1) - 1) // part + 1):
                if not (keys and keys[-1] == dst):
                    keys.append(dst)
        return len(keys)

    def flush(self) -> None:
        if self._slices() > 1:  # allreduce_bucket's flatten; one tensor is flattened as a view
            self.seq.temp(("flatten", self.step, len(self.seq.ops)), BF16 * self.elements)
        for name in self.names:
            in_partition = self.in_partition.get(name, 0)
            if in_partition <= 0:
                continue
            if self.spec.offload:
                if not self.boundary:
                    continue
                self.seq.temp(("norm64", self.step, name), 8 * in_partition)
                self.seq.temp(("to_fp32", self.step, name), 4 * in_partition)
            elif not self.made:
                self.seq.alloc(self.partition_key, BF16 * self.touching)
                self.made = True
        self.names.clear()
        self.elements = 0


def _init(seq: Sequence, groups: list[list[tuple[str, int]]], spec: RequestSpec):
    """``DeepSpeedZeroOptimizer.__init__``'s requests; (layout, parts, in_partition, touching) of ``Bucket``."""
    world = spec.world
    parts: list[int] = []
    in_partition: dict[str, int] = {}
    layout: dict[str, tuple[int, int, int]] = {}
    touching = 0
    for i, group in enumerate(groups):
        padded = flat_group_numel(sum(n for _, n in group), world)
        part = padded // world
        parts.append(part)
        seq.empty_cache()  # before each group's flatten
        if spec.flatten_on_cpu and i == 0:  # the group moves to the host, is flattened there, comes back whole
            for name, _ in group:
                seq.free(("param", name))
            seq.empty_cache()
            seq.alloc(("flat", i), BF16 * padded)
        else:
            seq.alloc(("flat", i), BF16 * padded)
            for name, _ in group:
                seq.free(("param", name))
        seq.alloc(("clone", i), BF16 * part)
        if not spec.offload:
            seq.alloc(("master", i), 4 * part)
        seq.free(("clone", i))
        start = 0
        for name, n in group:
            layout[name] = (i, start, n)
            if start < part:
                in_partition[name] = min(start + n, part) - start
                touching += n
            start += n
    if spec.offload:
        seq.alloc("temp_grad_buffer_for_gpu_offload", BF16 * max(n for group in groups for _, n in group))
    else:
        for i, part in enumerate(parts):
            seq.temp(("zero_fp32_grad", i), 4 * part)
    return layout, parts, in_partition, touching


def _step(seq: Sequence, step: int, parts: list[int], in_partition: dict[str, int], adam_temporary: bool) -> None:
    """``step`` without offload: norms, flat gradient partitions, Adam's states and temporary."""
    for name, n in in_partition.items():
        seq.temp(("gradnorm64", step, name), 8 * n)
    for i, part in enumerate(parts):
        seq.alloc(("flat_grad16", step, i), BF16 * part)
        seq.alloc(("fp32_grad", step, i), 4 * part)
        seq.free(("flat_grad16", step, i))
        if i == len(parts) - 1:  # the last group's averaged_gradients = None drops the last views of it
            seq.free(("grads_in_partition", step))
        if step == 0:
            seq.alloc(("exp_avg", i), 4 * part)
            seq.alloc(("exp_avg_sq", i), 4 * part)
        if adam_temporary:
            seq.temp(("adam_temp", step, i), 4 * part)
        seq.free(("fp32_grad", step, i))


def _drop_leftovers(seq: Sequence, micro: int, keep: set) -> None:
    """The micro-step's input ids and loss (and what else the trace left live), dropped by the loop."""
    for key in [k for k in seq.live if isinstance(k[0], int) and k[0] == micro and k not in keep]:
        seq.free(key)


def _returned_logits(trace: Trace) -> int:
    """The storage of the logits the model returns, which the custom loop keeps: the trace drops the output right
    after forward, so they are the logits-sized storage freed there (gemma-2 softcaps the head's output into a new
    tensor)."""
    dropped = [~e for e in trace.events[trace.marks["fwd_end"]:trace.marks["bwd_start"]] if e < 0]
    return next((serial for serial in dropped if trace.sizes[serial] == trace.sizes[trace.logits]), trace.logits)


def _workspace_points(trace: Trace) -> tuple[int, int | None]:
    """The trace events before which cuBLAS takes its two workspaces (module docstring)."""
    start = trace.marks["fwd_start"]
    first_large = next((at for at in range(start, len(trace.events)) if trace.events[at] >= 0
                        and trace.sizes[trace.events[at]] > MiB), start)
    return min(trace.marks.get("first_gemm_fwd", first_large + 1), first_large + 1), trace.marks.get("first_gemm_bwd")


def build(tensors: list[TensorSpec], buffer_bytes: list[int], trace: Trace, spec: RequestSpec) -> Sequence:
    """The sequence of the module docstring, for the model's parameters in ``named_parameters`` order, its buffers'
    bytes, and its traced forward and backward at full depth (``trace.recorder.run_trace``)."""
    seq = Sequence()
    for t in tensors:
        seq.alloc(("param", t.name), t.numel * t.element_size)
    for i, size in enumerate(buffer_bytes):
        seq.alloc(("buffer", i), size)
    seq.mark("build")
    groups = _groups(tensors, spec.param_groups)
    trainable = [entry for group in groups for entry in group]
    layout, parts, in_partition, touching = _init(seq, groups, spec)
    seq.mark("init")

    size_to_names: dict[int, list[str]] = {}
    for name, n in reversed(trainable):  # gradients come roughly in reverse order; names only pick a slice
        size_to_names.setdefault(BF16 * n, []).append(name)
    freed_by_trace = {~e for e in trace.events[:trace.marks["bwd_end"]] if e < 0}
    kept = None
    returned_logits = _returned_logits(trace)
    workspaces = _workspace_points(trace)
    for step in range(spec.steps):
        held: dict[int, list[tuple]] = {}  # stage 1: the first micro-step's gradients, until reduce_gradients
        held_keys: set[tuple] = set()
        for micro in range(spec.grad_accum):
            m, last = step * spec.grad_accum + micro, micro == spec.grad_accum - 1
            pending = {size: list(names) for size, names in size_to_names.items()}
            bucket = Bucket(seq, m, spec, layout, parts, in_partition, touching,
                            ("grads_in_partition", step) if micro == 0 else ("grads_in_partition", step, micro))
            bucket.boundary = last
            hook = None  # a final gradient whose AccumulateGrad, and DeepSpeed's hook in it, is still to run
            for at, event in enumerate(trace.events):
                if hook is not None and event >= 0:
                    bucket.add(hook[0], hook[1])
                    seq.free(hook[2])  # copied into the bucket, its own storage dropped
                    hook = None
                if m == 0 and at in workspaces:
                    seq.alloc(("cublas_workspace", at), CUBLAS_WORKSPACE_BYTES)
                if at == trace.marks.get("first_grad") and (spec.stage == 2 or micro == 0):
                    seq.alloc(("bucket", step), BF16 * spec.bucket_elements)
                if at == trace.marks["fwd_end"]:
                    if kept is not None:
                        seq.free(kept)
                    seq.mark(f"step{step}.forward{micro}")
                serial = event if event >= 0 else ~event
                key = (m, serial)
                if event >= 0:
                    seq.alloc(key, trace.sizes[serial])
                    if serial in trace.excluded and serial not in freed_by_trace:
                        names = pending.get(trace.sizes[serial])
                        name = names.pop(0) if names else f"?{serial}"
                        if spec.stage == 2:  # after the frees of the node that made it (a tied weight's parts)
                            hook = (name, trace.sizes[serial] // BF16, key)
                        elif micro == 0:  # reduced after the last backward (reduce_gradients), kept until then
                            held.setdefault(trace.sizes[serial] // BF16, []).append(key)
                            held_keys.add(key)
                        else:  # AccumulateGrad adds it into the held gradient in place
                            seq.free(key)
                elif serial == returned_logits and spec.loop == "custom":
                    kept = key
                elif key not in held_keys:  # the trace drops .grad after backward; DeepSpeed frees a held gradient
                    seq.free(key)  # as the bucket takes it
            if hook is not None:
                bucket.add(hook[0], hook[1])
                seq.free(hook[2])
            if spec.stage == 2 or last:
                if spec.stage == 1:
                    for name, n in trainable:  # reduce_gradients: the groups' parameters in order
                        keys = held.get(n)
                        if keys:
                            bucket.add(name, n)
                            seq.free(keys.pop())  # produced in reverse: the last one held of its size is this one
                bucket.flush()
                seq.free(("bucket", step))
                if micro > 0:  # the epilogue adds this micro-step's partition into the first one's, and drops it
                    seq.free(bucket.partition_key)
            seq.mark(f"step{step}.backward{micro}")
            if not last:
                _drop_leftovers(seq, m, keep={kept} | held_keys)
        if not spec.offload:
            _step(seq, step, parts, in_partition, spec.adam_temporary)
        _drop_leftovers(seq, step * spec.grad_accum + spec.grad_accum - 1, keep={kept})
        seq.mark(f"step{step}.step")
    return seq

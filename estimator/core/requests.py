"""The caching allocator's requests of a ZeRO-1/2 run, in order, and the reserve they leave (pure; no torch); which
setups a request sequence covers at any stage (``sequence_gap``; stage 3's builder is ``core.zero3_requests``, stage
0's ``core.zero0_requests``).

Torch's default caching allocator reserves a function of the request sequence alone: fed a run's recorded requests,
``core.allocator.CachingAllocatorModel`` gives its peak reserve to the byte (benchmarks/allocator_replay.py,
data/runs/h200-sequences). ``build`` writes that sequence from the model's tensors, a traced forward and backward
(``trace.requests`` traces it on the meta device) and DeepSpeed 0.19.8's source, for rank 0 of ``world`` ranks
(b the 16-bit width, P_g a group's trainable parameters, N the ranks):

* the model on the GPU: every parameter and buffer in ``named_parameters`` order (engine.py
  ``_configure_distributed_model``, ``module.to``);
* ``DeepSpeedZeroOptimizer.__init__``'s requests (``core.zero12_requests``);
* each micro-step: cuBLAS's workspace (``CUBLAS_WORKSPACE_BYTES``) at the first GEMM of the first forward (at the
  latest right after the first request over 1 MiB, the embeddings' output: transformers 5.17's rotary embedding runs a
  matmul there) and of the first backward (autograd's thread has its own handle), both kept; the traced forward and
  backward; the custom loop keeps the logits the model returns (gemma-2's softcapped ones, not the head's) until the
  next forward returns (custom-del until the micro-step ends), the trainer loop only the loss. At the first parameter
  gradient the ipg bucket (``setup_buckets``, b ``reduce_bucket_size``). At stage 2 each final gradient is copied into
  the bucket and its own storage dropped at its hook (``reduce_independent_p_g_buckets_and_remove_grads``), which
  ``AccumulateGrad`` runs once the node that made the gradient has freed what it frees (a tied weight's two parts,
  summed). A gradient that would overflow the bucket first flushes it (``core.zero12_requests.Bucket``). The last
  flush comes at the end of backward, then the bucket is released (``_release_ipg_buffers``). Stage 1 keeps every
  gradient until backward ends, then sends them through the bucket in the groups' order (``reduce_gradients``);
* with gradient accumulation (engine.py ``allreduce_gradients``): stage 2 reduces every micro-step. The first
  micro-step's ``grads_in_partition`` lives until the step; each later one makes its own at its first flush
  (``_release_ipg_buffers`` let the previous go), adds it into the first's tensors
  (``independent_gradient_partition_epilogue``: ``all_grad_tensors``, ``add_``) and drops it as its backward ends.
  Stage 1 reduces at the boundary only: the first micro-step's gradients are held, ``AccumulateGrad`` adds each
  later one into them in place (freed as it is made), and the bucket stays from the first gradient to the boundary.
  With offload the partition's fp64 and fp32 copies are made at the boundary only; before it
  (``async_accumulate_grad_in_cpu_via_gpu``) the gradients are added into host buffers through the kept GPU buffer;
* with ``overlap_comm``: two buckets (``setup_buckets``' ``buf_1``), the flushes' requests from the reduction
  stream's pools (``core.zero12_requests``), and at stage 1 the hooks reduce during the boundary micro-step's
  backward as at stage 2 (``process_gradients``, ``reduce_ready_partitions_and_remove_grads``), each taking the
  gradient held since the first micro-step;
* ``step``: ``core.zero12_requests.optimizer_step`` (with offload the step runs on the host).

Left out: requests under 1 MiB that DeepSpeed makes (scalars, NCCL's), kernel workspaces other than cuBLAS's, and
what a real NCCL group's streams hold back (``record_stream``): the sequence was held only against rank 0 of jobs on
a fake process group. ``sequence_gap`` says which setups it covers. Measured: docs/DEVICE_RUNS.md, ninth, tenth and
twelfth sessions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zeroest.estimator.core.request_types import RequestSpec, Sequence, TensorSpec
from zeroest.estimator.core.zero12_requests import (
    BF16,
    UPDATES,
    Bucket,
    optimizer_init,
    optimizer_step,
    param_groups,
)

if TYPE_CHECKING:
    from zeroest.estimator.core.setup import TrainingSetup
    from zeroest.estimator.trace.polys import Trace

MiB = 2**20
CUBLAS_WORKSPACE_BYTES = 32 * MiB
"""cuBLAS's workspace on a Hopper card, allocated through the caching allocator at a handle's first GEMM and kept:
one at the first forward's first matmul and one at the first backward's (all eighteen recordings of
data/runs/h200-sequences)."""


STAGE0_UPDATES = ("adamw-torch", "adamw-fused")
"""The updates ``core.zero0_requests`` writes at stage 0 (``FP16_UnfusedOptimizer`` around torch's AdamW,
``FP16_Optimizer`` around FusedAdam)."""


def update_of(setup: TrainingSetup) -> str:
    """The setup's update as ``core.zero12_requests.UPDATES`` names it (AdamW by its implementation); ``host`` for
    DeepSpeedCPUAdam, whose step makes no request on the GPU (the only CPU optimizer measured so)."""
    name, impl = str(setup.optimizer.name), str(setup.optimizer.impl)
    if name == "adamw":
        return "host" if impl == "cpu" else f"adamw-{impl}"
    return name


def sequence_gap(setup: TrainingSetup) -> str | None:
    """Why ``build`` (``core.zero3_requests.build3`` at stage 3, ``core.zero0_requests.build0`` at 0) does not cover
    the setup, or None where it does: ZeRO stage 0 with AdamW (torch's or FusedAdam), 1 or 2 (``contiguous_gradients``
    on), or 3 without parameter offload; either kind of segment, with or without gradient accumulation or
    ``overlap_comm``, an update of ``core.zero12_requests.UPDATES`` (AdamW from torch or FusedAdam, FusedLion,
    torch's SGD or Adafactor; with optimizer offload DeepSpeedCPUAdam), bf16 or fp16 (not fp16 at stage 1: the one
    row measured, h100-holdout row 1, holds 4 bytes a parameter more than the sequence from the second step on,
    unexplained), any of the three loops, full fine-tuning or LoRA (no other frozen weights, no quantised base), one
    or two parameter groups."""
    z, a, w = setup.zero, setup.adapters, setup.workload
    update = update_of(setup)
    stage3 = int(setup.stage) == 3
    checks = (
        (int(setup.stage) == 0 and update not in STAGE0_UPDATES,
         f"ZeRO stage 0 with {setup.optimizer.name} ({setup.optimizer.impl})"),
        (stage3 and str(z.offload_params) != "none", "stage 3 with parameter offload"),
        ((update == "host") != (str(z.offload_optimizer) != "none") or update not in (*UPDATES, "host"),
         f"optimizer {setup.optimizer.name} ({setup.optimizer.impl})"),
        (str(setup.dtype) not in ("bf16", "fp16"), f"{setup.dtype} training"),
        (str(setup.dtype) == "fp16" and int(setup.stage) == 1, "fp16 at ZeRO stage 1"),
        (str(w.loop) not in ("custom", "custom-del", "trainer"), f"the {w.loop} loop"),
        (not z.contiguous_gradients and int(setup.stage) in (1, 2), "contiguous_gradients off"),
        (bool(a.freeze or a.modules_to_save) or str(a.base_quant) != "none", "frozen weights or a quantised base"),
        (setup.optimizer.param_groups not in (1, 2), "more than two parameter groups"),
    )
    return next((why for failed, why in checks if failed), None)


def drop_leftovers(seq: Sequence, micro: int, keep: set) -> None:
    """The micro-step's input ids and loss (and what else the trace left live), dropped by the loop."""
    for key in [k for k in seq.live if isinstance(k[0], int) and k[0] == micro and k not in keep]:
        seq.free(key)


def returned_logits_of(trace: Trace) -> int:
    """The storage of the logits the model returns, which the custom loop keeps: the trace drops the output right
    after forward, so they are the logits-sized storage freed there (gemma-2 softcaps the head's output into a new
    tensor)."""
    dropped = [~e for e in trace.events[trace.marks["fwd_end"]:trace.marks["bwd_start"]] if e < 0]
    return next((serial for serial in dropped if trace.sizes[serial] == trace.sizes[trace.logits]), trace.logits)


def workspace_points(trace: Trace) -> tuple[int, int | None]:
    """The trace events before which cuBLAS takes its two workspaces (module docstring)."""
    start = trace.marks["fwd_start"]
    first_large = next((at for at in range(start, len(trace.events)) if trace.events[at] >= 0
                        and trace.sizes[trace.events[at]] > MiB), start)
    return min(trace.marks.get("first_gemm_fwd", first_large + 1), first_large + 1), trace.marks.get("first_gemm_bwd")


def before_event(seq: Sequence, trace: Trace, at: int, where: tuple[int, int, int], workspaces, kept) -> tuple:
    """What comes before trace event ``at`` of micro-step ``m`` (``where``: m, step, micro): cuBLAS's workspaces in
    the first micro-step, and at forward's end the outputs the loop kept from the previous micro-step dropped and the
    phase's end. The event's key (m, serial)."""
    m, step, micro = where
    if m == 0 and at in workspaces:
        seq.alloc(("cublas_workspace", at), CUBLAS_WORKSPACE_BYTES)
    if at == trace.marks["fwd_end"]:
        if kept is not None:
            seq.free(kept)
        seq.mark(f"step{step}.forward{micro}")
    event = trace.events[at]
    return m, event if event >= 0 else ~event


def traced_alloc(seq: Sequence, trace: Trace, key: tuple, pending: dict[int, list[str]],
                 freed_by_trace: set) -> str | None:
    """Allocate the traced storage of ``key`` (micro-step, serial); where it is a parameter's final gradient (the trace
    keeps it past backward), the name it is taken for, from ``pending`` (16-bit size -> names in reverse order, popped
    as gradients come: names only pick a partition's slice), else None."""
    serial = key[1]
    seq.alloc(key, trace.sizes[serial])
    if serial not in trace.excluded or serial in freed_by_trace:
        return None
    names = pending.get(trace.sizes[serial])
    return names.pop(0) if names else f"?{serial}"


def model_on_gpu(seq: Sequence, tensors: list[TensorSpec], buffer_bytes: list[int]) -> None:
    """The model on the GPU: every parameter and buffer in ``named_parameters`` order (engine.py
    ``_configure_distributed_model``, ``module.to``), then the ``build`` mark."""
    for t in tensors:
        seq.alloc(("param", t.name), t.numel * t.element_size)
    for i, size in enumerate(buffer_bytes):
        seq.alloc(("buffer", i), size)
    seq.mark("build")


def trace_points(trace: Trace, trainable: list[tuple[str, int]]) -> tuple[dict[int, list[str]], set, int, tuple]:
    """What every builder reads off the trace before the micro-steps: the trainable gradients' names by 16-bit size
    (in reverse, as gradients come: names only pick a key or a slice), the storages the trace frees before backward
    ends, the returned logits (``returned_logits_of``) and cuBLAS's workspace points (``workspace_points``)."""
    size_to_names: dict[int, list[str]] = {}
    for name, n in reversed(trainable):
        size_to_names.setdefault(BF16 * n, []).append(name)
    freed_by_trace = {~e for e in trace.events[:trace.marks["bwd_end"]] if e < 0}
    return size_to_names, freed_by_trace, returned_logits_of(trace), workspace_points(trace)


def build(tensors: list[TensorSpec], buffer_bytes: list[int], trace: Trace, spec: RequestSpec) -> Sequence:
    """The sequence of the module docstring, for the model's parameters in ``named_parameters`` order, its buffers'
    bytes, and its traced forward and backward at full depth (``trace.recorder.run_trace``)."""
    seq = Sequence()
    model_on_gpu(seq, tensors, buffer_bytes)
    groups = param_groups(tensors, spec.param_groups)
    trainable = [entry for group in groups for entry in group]
    layout, parts, in_partition, touching = optimizer_init(seq, groups, spec)
    seq.mark("init")

    size_to_names, freed_by_trace, returned_logits, workspaces = trace_points(trace, trainable)
    kept = None
    buckets = 2 if spec.overlap else 1  # setup_buckets: buf_1 for overlap_comm
    for step in range(spec.steps):
        held: dict[int, list[tuple]] = {}  # stage 1: the first micro-step's gradients, until reduce_gradients
        held_keys: set[tuple] = set()
        for micro in range(spec.grad_accum):
            m, last = step * spec.grad_accum + micro, micro == spec.grad_accum - 1
            pending = {size: list(names) for size, names in size_to_names.items()}
            bucket = Bucket(seq, m, spec, layout, parts, in_partition, touching,
                            ("grads_in_partition", step) if micro == 0 else ("grads_in_partition", step, micro),
                            boundary=last)
            hook = None  # a final gradient whose AccumulateGrad, and DeepSpeed's hook in it, is still to run
            for at, event in enumerate(trace.events):
                if hook is not None and event >= 0:
                    bucket.take(*hook)
                    hook = None
                key = before_event(seq, trace, at, (m, step, micro), workspaces, kept)
                serial = key[1]
                if at == trace.marks.get("first_grad") and (spec.stage == 2 or micro == 0):
                    for i in range(buckets):
                        seq.alloc(("bucket", step, i), BF16 * spec.bucket_elements)
                if event >= 0:
                    name = traced_alloc(seq, trace, key, pending, freed_by_trace)
                    if name is not None:
                        n = trace.sizes[serial] // BF16
                        if spec.stage == 2 or spec.overlap and last and micro == 0:
                            hook = (name, n, key)  # after the frees of the node that made it (a tied weight's parts)
                        elif micro == 0:  # reduced after the last backward (reduce_gradients), kept until then
                            held.setdefault(n, []).append(key)
                            held_keys.add(key)
                        else:  # AccumulateGrad adds it into the held gradient in place
                            seq.free(key)
                            if spec.overlap and last:  # stage 1 with overlap_comm: the hook takes the held sum
                                hook = (name, n, held[n].pop(0))
                elif serial == returned_logits and spec.loop in ("custom", "custom-del"):
                    kept = key
                elif key not in held_keys:  # the trace drops .grad after backward; DeepSpeed frees a held gradient
                    seq.free(key)  # as the bucket takes it
            if hook is not None:
                bucket.take(*hook)
            if spec.stage == 2 or last:
                if spec.stage == 1:
                    for name, n in trainable:  # reduce_gradients: the groups' parameters in order
                        keys = held.get(n)
                        if keys:  # produced in reverse: the last one held of its size is this one
                            bucket.take(name, n, keys.pop())
                bucket.flush()
                for i in range(buckets):
                    seq.free(("bucket", step, i))
                if micro > 0:  # the epilogue adds this micro-step's partition into the first one's, and drops it
                    seq.free(bucket.partition_key)
            seq.mark(f"step{step}.backward{micro}")
            outputs = {kept} if spec.loop == "custom" else set()  # custom-del deletes them after each micro-step
            if not last:
                drop_leftovers(seq, m, keep=outputs | held_keys)
        if not spec.offload:
            optimizer_step(seq, step, parts, in_partition, spec.optimizer)
        drop_leftovers(seq, m, keep=outputs)
        seq.mark(f"step{step}.step")
    return seq

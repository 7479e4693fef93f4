"""The caching allocator's requests of a ZeRO-3 run, in order (pure; no torch): DeepSpeed 0.19.8's
runtime/zero/stage3.py, partition_parameters.py and partitioned_param_coordinator.py around a traced forward and
backward whose module hooks are marked as stage 3 places them (``trace.recorder``: ``fwd_pre``, ``fwd_post``,
``bwd_rpre``, ``bwd_rpost``, ``bwd_bpre``, ``bwd_bpost`` per module), for rank 0 of N ranks. p a parameter's
elements, c = ceil(p / N) its partition, S_k a sub-group's partitions, S all trainable ones, b = 2 bytes (bf16).

Three pools (``record_stream`` aside, what the recordings of data/runs/h200-sequences show): the default stream's;
``AG_STREAM``, the coordinator's all-gather stream, where every gather of a module fetch or prefetch is made
(``__all_gather_params`` under ``stream(self.__allgather_stream)``); ``RS_STREAM``, the reduce-and-partition
stream, where the gradient buckets are reduce-scattered.

* build and init, with the model on the GPU before ``deepspeed.initialize``: every parameter and buffer (engine.py
  ``_configure_distributed_model``); per parameter its partition (b c, ``_partition_param``) and the full tensor
  freed (``free_param``). Under zero.Init (partition_parameters.py ``Init``) each module's parameters are made as
  it is built, in fp32 (4 p) and cast to 16 bits (b p, the fp32 freed), and partitioned as its ``__init__``
  returns (``_post_init_method``); the model is never whole. Then, either way: ``defragment`` (zero/utils.py):
  the trainable partitions freed, ``empty_cache()``, one flat ``lp_param_buffer`` (b S); ``_create_fp32_partitions``
  per sub-group: the fp32 conversion (4 S_k), its clone kept as the master, the conversion freed after the next one
  is made; ``initialize_optimizer_states``' zero fp32 gradient (4 max S_k, made and dropped); the ipg bucket
  (b ``reduce_bucket_size``, kept); ``grad_partitions_flat_buffer`` (b S, kept); and in
  ``create_reduce_and_remove_grad_hooks`` each trainable parameter gathered whole (b N c) and freed at once.
  With optimizer offload the fp32 buffers and the gradient partitions are on the host;
* each module fetch (``fetch_sub_module``): its parameters not available are gathered on ``AG_STREAM``, one alone
  into b N c that becomes the parameter (``_all_gather_sequential``), several into one flat b N sum(c)
  (``_all_gather_dtype``) of which the first wait makes each member's own b p copy (``AllGatherCoalescedHandle.
  wait``: ``torch.cat``) and which is freed when the last member has been waited on; from the second forward on
  (the module trace is complete: ``reset_step``) one prefetch bucket follows each fetch, module with parameters or
  not: the trace's next parameters not available, until they pass ``min(max_live - available,
  prefetch_bucket_size)`` elements. A release (``release_sub_module``) frees the gathered parameters: in the first
  forward and backward all of the module's, later only those not used again within ``max_reuse_distance``
  elements of the trace and not already prefetched for a later use (``__params_to_release``), never the
  persistent ones (p <= ``param_persistence_threshold``). peft reads ``lora_A.weight`` in the LoRA layer's forward
  before ``lora_A`` runs: a parameter not available then is gathered whole on the default stream
  (``ZeROOrderedDict.__getitem__``, ``_allgather_params_sequential``);
* each gradient (b p, from the trace) is copied into the ipg bucket by its hook
  (``reduce_independent_p_g_buckets_and_remove_grads``, after the node that made it has freed what it frees) and
  dropped; a gradient that would overflow the bucket flushes it first (``__reduce_and_partition_ipg_grads``:
  ``reduce_scatter_coalesced``'s interleaved copy, b N sum(c) on ``RS_STREAM``, none for one tensor that N
  divides), the last flush at the end of backward (``independent_gradient_partition_epilogue``); with offload,
  ``partition_grads`` brings each partition back (b c) and at the accumulation boundary makes its fp64 norm and
  fp32 copy (8 c, 4 c). Modules whose inputs need no gradient release at the end of backward
  (``release_backward_leftovers``);
* ``step``: every gathered parameter released (``_partition_all_parameters``); without offload, in fp16 only,
  ``has_overflow`` on ``grad_partitions_flat_buffer`` under ``stream(self.reduce_and_partition_stream)``
  (``torch.isinf``'s absolute value, b S, with its boolean result, S bytes, then ``torch.isnan``'s, S bytes; each
  made and dropped); the fp64 norm of each gradient partition (8 c, made and dropped), then per sub-group the flat
  16-bit gradient (b S_k), its fp32 copy (4 S_k, the first dropped), the update's states and temporaries
  (``core.zero12_requests``), the fp32 gradient dropped; then the persistent parameters gathered again on the
  default stream (``_post_step``), kept.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from zeroest.estimator.core.request_types import ModuleSpec, Sequence
from zeroest.estimator.core.zero3_coordinator import RS_STREAM, Coordinator, Param
from zeroest.estimator.core.zero12_requests import BF16, param_groups, state_update

if TYPE_CHECKING:
    from zeroest.estimator.core.request_types import RequestSpec, TensorSpec
    from zeroest.estimator.trace.polys import Trace

_MARK = re.compile(r"(layer\d+_|top_)(?:fwd|bwd)_(pre|post|rpre|rpost|bpre|bpost|hold|drop)(\d+)(_\d+)?(?:c\d+)?")


def _sub_groups(groups: list[list[str]], parts: dict[str, int], size: int) -> list[list[str]]:
    """``_create_fp16_sub_groups``: each optimizer group cut after the parameter that brings its partitions to
    ``sub_group_size``."""
    out = []
    for group in groups:
        current, total = [], 0
        for name in group:
            current.append(name)
            total += parts[name]
            if total >= size:
                out.append(current)
                current, total = [], 0
        if current:
            out.append(current)
    return out


class _Bucket:
    """The ipg bucket of stage 3 (``__add_grad_to_ipg_bucket``, ``__reduce_and_partition_ipg_grads``)."""

    def __init__(self, seq: Sequence, spec: RequestSpec, params: dict[str, Param]) -> None:
        self.seq, self.spec, self.params = seq, spec, params
        self.entries: list[tuple[str, int]] = []
        """The bucket's gradients: (parameter, elements)."""
        self.elements = 0
        self.flushes = 0
        self.stream = RS_STREAM if spec.overlap else 0

    def take(self, name: str, numel: int, key, *, boundary: bool) -> None:
        if self.entries and self.elements + numel > self.spec.bucket_elements:
            self.flush(boundary=boundary)
        self.entries.append((name, numel))
        self.elements += numel
        self.seq.free(key)

    def flush(self, *, boundary: bool) -> None:
        if not self.entries:
            return
        world = self.spec.world
        # a gradient the trace could not name (sizes matched to parameters ran out) counts the whole bucket's
        # partition: kept as measured (taking its own elements moved 24 LoRA rows by up to 2 points; not looked into)
        parts = [self.params[n].part if n in self.params else -(-self.elements // world) for n, _ in self.entries]
        self.flushes += 1
        cat = ("reduce_scatter", self.flushes)
        name, numel = self.entries[0]
        single = len(self.entries) == 1 and name in self.params and numel % world == 0
        if not single:  # one tensor that N divides is reduced in place
            self.seq.alloc(cat, BF16 * world * sum(parts), self.stream)
        if self.spec.offload:
            for (name, _), part in zip(self.entries, parts, strict=True):
                back = ("grad_to_device", self.flushes, name)
                self.seq.alloc(back, BF16 * part, self.stream)
                if boundary:
                    self.seq.temp(("norm64", self.flushes, name), 8 * min(part, 250_000_000), self.stream)
                    self.seq.temp(("to_fp32", self.flushes, name), 4 * part, self.stream)
                self.seq.free(back)
        self.seq.free(cat)
        self.entries.clear()
        self.elements = 0


def _marks(trace: Trace, unhooked: set[str]) -> dict[int, list[tuple[str, str, str]]]:
    """The module-hook marks by event: (what, module key, parameter index or mark), in recorded order; none of the
    modules DeepSpeed does not hook (inside a leaf)."""
    out: dict[int, list[tuple[str, str, str]]] = {}
    for name, at in sorted(trace.marks.items(), key=lambda item: item[1]):
        found = _MARK.fullmatch(name)
        if found and (found[2] in ("hold", "drop") or f"{found[1]}{found[3]}" not in unhooked):
            out.setdefault(at, []).append((found[2], f"{found[1]}{found[3]}", found[4] or name))
    return out


def build3(tensors: list[TensorSpec], buffer_bytes: list[int], modules: list[ModuleSpec], trace: Trace,
           spec: RequestSpec) -> Sequence:
    """The sequence of the module docstring for the model's parameters in ``named_parameters`` order, its buffers'
    bytes, its modules (``ModuleSpec``, every module ZeRO-3 hooks) and its forward and backward traced with the
    module-hook marks at full depth."""
    from zeroest.estimator.core.requests import (
        before_event,
        drop_leftovers,
        model_on_gpu,
        trace_points,
        traced_alloc,
    )

    seq = Sequence()
    world = spec.world
    params = {t.name: Param(t.name, t.numel, -(-t.numel // world), t.numel <= spec.persistence_threshold)
              for t in tensors}
    if spec.zero_init:  # built under zero.Init: each module's parameters made, then partitioned as it returns
        for m in modules:
            for name in m.params:
                if ("ds", name) in seq.live:
                    continue  # a tied weight, made once
                seq.alloc(("fp32_param", name), 4 * params[name].numel)
                seq.alloc(("param", name), BF16 * params[name].numel)
                seq.free(("fp32_param", name))
            for name in m.params:
                if ("param", name) in seq.live:
                    seq.alloc(("ds", name), BF16 * params[name].part)
                    seq.free(("param", name))
    model_on_gpu(seq, [] if spec.zero_init else tensors, buffer_bytes)  # else the model whole, then its buffers
    if not spec.zero_init:  # _convert_to_zero_parameters: each parameter partitioned in turn by initialize
        for t in tensors:
            seq.alloc(("ds", t.name), BF16 * params[t.name].part)
            seq.free(("param", t.name))
    groups = [[name for name, _ in group] for group in param_groups(tensors, spec.param_groups)]
    trainable = [name for group in groups for name in group]
    for name in trainable:  # defragment: the trainable partitions go to the host and come back as one buffer
        seq.free(("ds", name))
    seq.empty_cache()
    total = sum(params[n].part for n in trainable)
    seq.alloc("lp_param_buffer", BF16 * total)
    subs = _sub_groups(groups, {n: p.part for n, p in params.items()}, spec.sub_group_size)
    decayed = set(groups[0]) if len(groups) == 2 else set()
    sizes = [sum(params[n].part for n in sub) for sub in subs]
    if not spec.offload:
        for k, size in enumerate(sizes):
            seq.alloc(("fp32_convert", k), 4 * size)
            seq.alloc(("master", k), 4 * size)
            if k:
                seq.free(("fp32_convert", k - 1))
        seq.free(("fp32_convert", len(sizes) - 1))
        seq.temp("zero_fp32_grad", 4 * max(sizes))
    seq.alloc("ipg_bucket", BF16 * spec.bucket_elements)
    if not spec.offload:
        seq.alloc("grad_partitions", BF16 * total)
    for name in trainable:  # create_reduce_and_remove_grad_hooks: each gathered whole and partitioned again
        seq.temp(("hook_gather", name), BF16 * world * params[name].part)
    seq.mark("init")

    by_key = {m.key: m for m in modules}
    coordinator = Coordinator(seq, params, by_key, spec)
    key_of = {m.name: m.key for m in modules}
    lora_a = {m.key: key_of[parent] for m in modules if ".lora_A." in m.name
              and (parent := m.name.rsplit(".lora_A.", 1)[0]) in key_of}
    marks = _marks(trace, {m.key for m in modules if not m.hooked})
    leaf_of = {name: m.key for m in modules if m.leaf for name in m.params}
    leaf_grads: dict[str, dict[str, tuple]] = {}  # a leaf's gradients, held until its backward hook
    size_to_names, freed_by_trace, returned_logits, workspaces = trace_points(
        trace, [(name, params[name].numel) for name in trainable])
    kept = None
    for step in range(spec.steps):
        for micro in range(spec.grad_accum):
            m, last = step * spec.grad_accum + micro, micro == spec.grad_accum - 1
            coordinator.reset()
            pending = {size: list(names) for size, names in size_to_names.items()}
            bucket = _Bucket(seq, spec, params)
            hook = None
            for at, event in enumerate(trace.events):
                if hook is not None and (event >= 0 or at in marks):
                    bucket.take(*hook, boundary=last)
                    hook = None
                for what, module, extra in marks.get(at, ()):
                    if what in ("pre", "rpre"):
                        if module in lora_a:
                            coordinator.external(module, lora_a[module])
                        coordinator.fetch(module, forward=True)
                    elif what == "bpre":
                        coordinator.fetch(module, forward=False)
                    elif what in ("hold", "drop"):  # a saved view of parameter j's gathered storage
                        coordinator.hold(module, int(extra[1:]), held=what == "hold")
                    else:
                        if what == "bpost" and module in leaf_grads:  # reduce_leaf_module_grads, in parameter order
                            held = leaf_grads.pop(module)
                            for name in by_key[module].params:
                                if name in held:
                                    bucket.take(*held[name], boundary=last)
                        coordinator.release(module, forward=what != "bpost")
                key = before_event(seq, trace, at, (m, step, micro), workspaces, kept)
                serial = key[1]
                if event >= 0:
                    name = traced_alloc(seq, trace, key, pending, freed_by_trace)
                    if name is not None and name in leaf_of:
                        leaf_grads.setdefault(leaf_of[name], {})[name] = (name, trace.sizes[serial] // BF16, key)
                    elif name is not None:
                        hook = (name, trace.sizes[serial] // BF16, key)
                elif serial == returned_logits and spec.loop in ("custom", "custom-del"):
                    kept = key
                else:
                    seq.free(key)
            if hook is not None:
                bucket.take(*hook, boundary=last)
            bucket.flush(boundary=last)
            coordinator.leftovers()
            seq.mark(f"step{step}.backward{micro}")
            outputs = {kept} if spec.loop == "custom" else set()
            if not last:
                drop_leftovers(seq, m, keep=outputs)
        coordinator.release_all()
        if not spec.offload:
            if spec.fp16:  # has_overflow: torch.isinf (abs(x) == inf) and torch.isnan (x != x) of the partitions
                stream, flat = RS_STREAM if spec.overlap else 0, ("overflow", step)
                seq.alloc(flat + ("abs",), BF16 * total, stream)
                seq.alloc(flat + ("isinf",), total, stream)
                seq.free(flat + ("abs",))
                seq.free(flat + ("isinf",))
                seq.temp(flat + ("isnan",), total, stream)
            for name in trainable:
                seq.temp(("gradnorm64", step, name), 8 * params[name].part)
            for k, (sub, size) in enumerate(zip(subs, sizes, strict=True)):
                if len(sub) > 1:
                    seq.alloc(("flat_grad16", step, k), BF16 * size)
                seq.alloc(("fp32_grad", step, k), 4 * size)
                seq.free(("flat_grad16", step, k))
                state_update(seq, step, k, 4 * size, spec.optimizer, decay=sub[0] in decayed)
                seq.free(("fp32_grad", step, k))
        for p in params.values():  # _post_step: the persistent parameters gathered again, kept
            if p.persistent:
                p.key = ("persistent", p.name, step)
                seq.alloc(p.key, BF16 * world * p.part)
                p.status = "available"
        drop_leftovers(seq, m, keep=outputs)
        seq.mark(f"step{step}.step")
    return seq

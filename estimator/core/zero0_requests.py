"""The caching allocator's requests of a run without ZeRO partitioning (stage 0) in 16 bits, in order (pure; no
torch): DeepSpeed 0.19.8 wraps the optimizer in ``FP16_Optimizer`` where it is FusedAdam and in
``FP16_UnfusedOptimizer`` otherwise (engine.py ``_configure_fp16_optimizer``; bf16 too, as ``DDP_BFLOAT16``:
``_do_optimizer_sanity_check``). b is the 16-bit width, n a parameter's elements, P_g a group's trainable ones.

* the model on the GPU, as at stages 1-2 (``core.requests``);
* ``__init__``, group by group. FusedAdam (fp16/fused_optimizer.py): each parameter's ``clone`` (b n), their
  ``_flatten_dense_tensors`` (b P_g), the clones dropped, the parameters' own storage freed as they become views of
  the flat buffer (``p.data = q.data``); the master ``clone().float()`` (b P_g, then 4 P_g; the clone freed). Any
  other optimizer (fp16/unfused_optimizer.py): per parameter ``p.clone().float()`` (b n, then 4 n kept; the clone
  freed). Then ``initialize_optimizer_states``: FusedAdam a zero fp32 gradient per group (4 P_g), the step's
  ``exp_avg`` and ``exp_avg_sq`` (4 P_g each), the gradients dropped; unfused, a zero 16-bit gradient per parameter
  (b n), a zero fp32 one (4 n), the step (``_multi_tensor_adamw``: per group each parameter's two states, 4 n each,
  then ``_foreach_sqrt``'s temporaries, 4 n each, dropped together), then the 16-bit gradients dropped, then the
  fp32 ones;
* each micro-step: the traced forward and backward with cuBLAS's workspaces and what the loop keeps, as at stages
  1-2. The first micro-step's gradients are held to the step; ``AccumulateGrad`` adds each later one into them in
  place (freed as made). At the accumulation boundary, after backward, ``allreduce_gradients``
  (``buffered_allreduce_fallback``, ``allreduce_no_retain``): the gradients in ``module.parameters()`` order cut
  into buckets closed by the tensor that takes them past 500 million elements (``MEMORY_OPT_ALLREDUCE_SIZE``), each
  bucket of two tensors or more flattened (``allreduce_bucket``, b times its elements) and dropped once copied back;
  with one rank too;
* ``step``, group by group. FusedAdam: each gradient's ``.to(fp32)`` (4 n), their flatten (4 P_g, the fp32 gradient),
  the per-parameter copies dropped, then the 16-bit gradients (``p.grad = None``); the update in place; the fp32
  gradients dropped. Unfused: ``get_weight_norm``'s ``.float()`` of each gradient (4 n, made and dropped), then each
  fp32 gradient (``.to``, 4 n, kept); the update (``_foreach_sqrt``: 4 n each, dropped together), then per group the
  fp32 gradients dropped; the engine's ``zero_grad`` drops the 16-bit gradients.

Left out: stage 0 without 16 bits (the optimizer on the model's own parameters), and updates other than AdamW's
(``core.requests.sequence_gap``). Recorded: data/runs/h200-sequences/s0rec{1,2,3,4}-events.json.gz
(docs/DEVICE_RUNS.md, fourteenth session).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zeroest.estimator.core.request_types import Sequence
from zeroest.estimator.core.requests import before_event, drop_leftovers, model_on_gpu, trace_points, traced_alloc
from zeroest.estimator.core.zero12_requests import BF16, param_groups

if TYPE_CHECKING:
    from zeroest.estimator.core.request_types import RequestSpec, TensorSpec
    from zeroest.estimator.trace.polys import Trace

FP32 = 4
ALLREDUCE_ELEMENTS = 500_000_000
"""engine.py ``MEMORY_OPT_ALLREDUCE_SIZE``: the elements after which ``allreduce_no_retain`` closes a bucket."""


def _init(seq: Sequence, groups: list[list[tuple[str, int]]], fused: bool) -> None:
    """The wrapper's ``__init__`` and ``initialize_optimizer_states`` (module docstring)."""
    for i, group in enumerate(groups):
        total = sum(n for _, n in group)
        if fused:
            for name, n in group:
                seq.alloc(("clone", name), BF16 * n)
            seq.alloc(("flat16", i), BF16 * total)
            for name, _ in group:
                seq.free(("clone", name))
            for name, _ in group:
                seq.free(("param", name))
            seq.alloc(("flat_clone", i), BF16 * total)
            seq.alloc(("master", i), FP32 * total)
            seq.free(("flat_clone", i))
        else:
            for name, n in group:
                seq.alloc(("clone", name), BF16 * n)
                seq.alloc(("master", name), FP32 * n)
                seq.free(("clone", name))
    if fused:
        for i, group in enumerate(groups):
            seq.alloc(("zero_grad32", i), FP32 * sum(n for _, n in group))
        for i, group in enumerate(groups):
            for state in ("exp_avg", "exp_avg_sq"):
                seq.alloc((state, i), FP32 * sum(n for _, n in group))
        for i in range(len(groups)):
            seq.free(("zero_grad32", i))
        return
    every = [entry for group in groups for entry in group]
    for name, n in every:
        seq.alloc(("zero_grad16", name), BF16 * n)
    for name, n in every:
        seq.alloc(("zero_grad32", name), FP32 * n)
    for group in groups:
        for name, n in group:
            seq.alloc(("exp_avg", name), FP32 * n)
            seq.alloc(("exp_avg_sq", name), FP32 * n)
        _sqrt_temporaries(seq, ("init",), group)
    for name, _ in every:
        seq.free(("zero_grad16", name))
    for name, _ in every:
        seq.free(("zero_grad32", name))


def _sqrt_temporaries(seq: Sequence, at: tuple, group: list[tuple[str, int]]) -> None:
    """torch/optim/adamw.py ``_multi_tensor_adamw``: ``torch._foreach_sqrt(exp_avg_sqs)``, one fp32 tensor per
    parameter, all dropped as the update returns."""
    for name, n in group:
        seq.alloc(("sqrt", *at, name), FP32 * n)
    for name, _ in group:
        seq.free(("sqrt", *at, name))


def _allreduce(seq: Sequence, step: int, sizes: list[int]) -> None:
    """``allreduce_no_retain`` over the gradients' elements in ``module.parameters()`` order."""
    bucket: list[int] = []
    for k, n in enumerate(sizes):
        bucket.append(n)
        if sum(bucket) > ALLREDUCE_ELEMENTS or k == len(sizes) - 1:
            if len(bucket) > 1:
                seq.temp(("allreduce_flat", step, k), BF16 * sum(bucket))
            bucket = []


def _step(seq: Sequence, step: int, groups: list[list[tuple[str, int]]], held: dict[tuple, str],
          fused: bool) -> None:
    """The wrapper's ``step`` and the engine's ``zero_grad`` (module docstring); ``held``: the 16-bit gradients'
    keys, each with its parameter's name (a parameter without one has nothing to drop)."""
    grad_of = {name: key for key, name in held.items()}
    if fused:
        for i, group in enumerate(groups):
            for name, n in group:
                seq.alloc(("grad32", step, name), FP32 * n)
            seq.alloc(("flat_grad32", step, i), FP32 * sum(n for _, n in group))
            for name, _ in group:
                seq.free(("grad32", step, name))
            for name, _ in group:
                seq.free(grad_of.get(name))
        for i in range(len(groups)):
            seq.free(("flat_grad32", step, i))
        return
    for group in groups:
        for name, n in group:
            seq.temp(("norm32", step, name), FP32 * n)
        for name, n in group:
            seq.alloc(("grad32", step, name), FP32 * n)
    for group in groups:
        _sqrt_temporaries(seq, (step,), group)
    for group in groups:
        for name, _ in group:
            seq.free(("grad32", step, name))
    for group in groups:
        for name, _ in group:
            seq.free(grad_of.get(name))


def build0(tensors: list[TensorSpec], buffer_bytes: list[int], trace: Trace, spec: RequestSpec) -> Sequence:
    """The sequence of the module docstring, for the model's parameters in ``named_parameters`` order, its buffers'
    bytes, and its traced forward and backward at full depth."""
    seq = Sequence()
    model_on_gpu(seq, tensors, buffer_bytes)
    fused = spec.optimizer == "adamw-fused"
    groups = param_groups(tensors, spec.param_groups)
    _init(seq, groups, fused)
    seq.mark("init")

    trainable = [entry for group in groups for entry in group]
    in_module_order = [t.numel for t in tensors if t.trainable]
    size_to_names, freed_by_trace, returned_logits, workspaces = trace_points(trace, trainable)
    kept = None
    for step in range(spec.steps):
        held: dict[tuple, str] = {}  # the first micro-step's gradients, to the step
        for micro in range(spec.grad_accum):
            m, last = step * spec.grad_accum + micro, micro == spec.grad_accum - 1
            pending = {size: list(names) for size, names in size_to_names.items()}
            for at, event in enumerate(trace.events):
                key = before_event(seq, trace, at, (m, step, micro), workspaces, kept)
                serial = key[1]
                if event >= 0:
                    name = traced_alloc(seq, trace, key, pending, freed_by_trace)
                    if name is not None:
                        if micro == 0:
                            held[key] = name
                        else:  # AccumulateGrad adds it into the held gradient in place
                            seq.free(key)
                elif serial == returned_logits and spec.loop in ("custom", "custom-del"):
                    kept = key
                elif key not in held:
                    seq.free(key)
            if last:
                _allreduce(seq, step, in_module_order)
            seq.mark(f"step{step}.backward{micro}")
            outputs = {kept} if spec.loop == "custom" else set()
            if not last:
                drop_leftovers(seq, m, keep=outputs | set(held))
        _step(seq, step, groups, held, fused)
        drop_leftovers(seq, m, keep=outputs)
        seq.mark(f"step{step}.step")
    return seq

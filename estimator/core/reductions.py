"""When ZeRO-2 reduces gradients during backward, and what each reduction holds at once.

runtime/zero/stage_1_and_2.py, stage 2 with ``contiguous_gradients`` and no offload: each parameter's gradient hook
(``reduce_independent_p_g_buckets_and_remove_grads``) copies the gradient into the ipg bucket of B_r elements; when
the bucket's E elements plus the arriving gradient's n would pass B_r, it first reduces the bucket
(``reduce_ipg_grads`` -> ``average_tensor``). ``average_tensor`` cuts the bucket into one slice per rank whose
partition it overlaps (consecutive ranges of one rank merged), and with ``use_multi_rank_bucket_allreduce`` (the
default) ``allreduce_and_scatter`` -> ``allreduce_bucket`` flattens the slices (``self.flatten``,
``torch._utils._flatten_dense_tensors``): a copy of b E bytes when the bucket spans two or more partitions, a
view of one slice otherwise, while the arriving gradient (b n) waits in the hook; then ``copy_grads_in_partition``
allocates ``grads_in_partition`` on the first reduction (``torch.empty`` of the whole parameters overlapping the
rank's partition) and keeps it. The last bucket is reduced the same way at the end of backward.

Gradients arrive in backward order: the head's parameters (lm_head, the final norm), then the decoder layers from
the last to the first, then the embeddings (a tied lm_head's gradient arrives with them): the reverse of
``named_parameters``, to the layer. A gradient of more than B_r elements goes alone (``extra_large_param_to_reduce``):
this walk counts it in the bucket like any other; the one case measured, an lm_head larger than the bucket reduced
at the first hook, is ``timeline._stage2_at_head_hook``.

Stage 3 (runtime/zero/stage3.py) walks the same order: ``reduce_independent_p_g_buckets_and_remove_grads`` reduces
the ipg bucket (``__reduce_and_partition_ipg_grads``) when the arriving gradient would pass B_r; with the default
``reduce_scatter`` it goes through ``__avg_scatter_grads`` -> comm/coalesced_collectives.py
``reduce_scatter_coalesced``, whose ``torch.cat`` of every tensor's rank chunks (each padded to ceil(n / N)) is a
copy of about b E bytes (none for one tensor that N divides); ``partition_grads`` copies this rank's chunks out and
the copy is freed. Measured on the H200: llama2-2.7b ZeRO-3 N_d 8 with checkpointing peaks in backward at a
946.3 MiB allocation, a bucket's concatenation (benchmarks/snapshot_peak.py without stacks, docs/DEVICE_RUNS.md),
while the gathered parameters (``stage3.gathered_numel``) are live as in the layers' backward: checkpointing
re-gathers each layer for its recompute. Without checkpointing the gathered parameters of the layers already done
are released, and the measured rows (tinyllama, qwen2.5-3b and a small Mixtral at ZeRO-3, data/runs/h200-zeroinit,
h200-families) peak at or below the head's candidate: stage 3 counts these reductions only under checkpointing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from zeroest.estimator.core.model_states import flat_group_numel, trained
from zeroest.estimator.core.setup import TrainingSetup, ZeroStage

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True, kw_only=True)
class Reduction:
    """One bucket reduction during backward, in elements."""

    layers_done: int
    """Decoder layers whose backward had finished (the layer of the arriving gradient counts as not done)."""
    flattened_numel: int
    """E: the bucket's elements, copied once more by the flatten; 0 when the bucket lies in one rank's partition
    (the flatten of one slice is a view). Stage 3: the concatenation's elements, each tensor padded to a multiple
    of N_d; 0 for one tensor that N_d divides."""
    arriving_numel: int
    """n: the gradient whose arrival triggered the reduction, live in the hook meanwhile (0 at the end)."""
    first: bool
    """The first reduction: ``grads_in_partition`` is allocated only after its flatten."""
    in_layer: bool = False
    """The arriving gradient belongs to a decoder layer (not to the head or the embeddings)."""
    layer_left: float = 1.0
    """Share of the in-progress layer's parameters whose gradients had not arrived (the arriving one included):
    the share of that layer's saved activations counted as still live (an interpolation: backward frees a
    layer's activations as it walks through it, and its gradients arrive on the way)."""


def _layer_of(name: str) -> int | None:
    found = _LAYER_INDEX.search(name)
    return int(found.group(1)) if found else None


def _flat_layout(tensors: list, world_size: int, groups: int) -> tuple[dict[str, int], dict[str, int]]:
    """Each tensor's offset in its group's flat buffer and that group's partition size. One group, or with two
    or more the HF Trainer's pair (``get_decay_parameter_names``: biases and norm weights apart), each flattened
    in ``named_parameters`` order and partitioned on its own (``flatten_dense_tensors_aligned`` per group)."""
    def group_of(tensor) -> int:
        return 1 if groups > 1 and (tensor.component == "norms" or tensor.name.endswith("bias")) else 0

    starts, totals = {}, [0, 0]
    for tensor in tensors:
        g = group_of(tensor)
        starts[tensor.name], totals[g] = totals[g], totals[g] + tensor.numel
    part = [max(1, flat_group_numel(total, world_size) // world_size) for total in totals]
    return starts, {tensor.name: part[group_of(tensor)] for tensor in tensors}


def backward_reductions(setup: TrainingSetup) -> tuple[Reduction, ...]:
    """The bucket reductions of one ZeRO-2 or ZeRO-3 backward, in order; none at other stages, at N_d 1, at stage 2
    with offload or without ``contiguous_gradients`` (their reduce paths differ), and at stage 3 without
    checkpointing (see the module's docstring)."""
    zero = setup.zero
    stage3 = setup.stage == ZeroStage.PARAMETERS
    if setup.world_size == 1 or not (stage3 and setup.workload.grad_ckpt or setup.stage == ZeroStage.GRADIENTS
                                     and zero.offload_optimizer == "none" and zero.contiguous_gradients):
        return ()
    num_layers, bucket = setup.model.num_layers, zero.reduce_bucket_size
    tensors = list(trained(setup).trainable)  # frozen parameters have no hook and no place in the flat group
    layer_params = [t for t in tensors if _layer_of(t.name) is not None]
    head = [t for t in tensors if _layer_of(t.name) is None and t.component in ("lm_head", "norms")]
    rest = [t for t in tensors if _layer_of(t.name) is None and t not in head]
    order = [*reversed(head), *reversed(layer_params), *reversed(rest)]
    per_layer: dict[int, int] = {}
    for tensor in layer_params:
        index = _layer_of(tensor.name)
        per_layer[index] = per_layer.get(index, 0) + tensor.numel
    starts, parts = _flat_layout(tensors, setup.world_size, setup.optimizer.param_groups)
    out: list[Reduction] = []
    elements, arrived, current, touched, bucketed = 0, 0, None, set(), []

    def copied() -> int:  # stage 2: the flatten, when the bucket spans partitions; stage 3: the concatenation
        if stage3:
            world = setup.world_size
            single = len(bucketed) == 1 and bucketed[0] % world == 0
            return 0 if single else sum(-(-n // world) * world for n in bucketed)
        return elements if len(touched) > 1 else 0

    for tensor in order:
        layer = _layer_of(tensor.name) if tensor not in head else None
        if layer != current:
            current, arrived = layer, 0
        done = 0 if tensor in head else (num_layers if layer is None else num_layers - 1 - layer)
        if elements and elements + tensor.numel > bucket:
            left = 1 - arrived / per_layer[layer] if layer is not None else 1.0
            out.append(Reduction(layers_done=done, flattened_numel=copied(), arriving_numel=tensor.numel,
                                 first=not out, in_layer=layer is not None, layer_left=left))
            elements, touched, bucketed = 0, set(), []
        elements += tensor.numel
        bucketed.append(tensor.numel)
        arrived += tensor.numel
        start, part = starts[tensor.name], parts[tensor.name]
        touched.update(range(start // part, (start + tensor.numel - 1) // part + 1))
    if elements:
        out.append(Reduction(layers_done=num_layers, flattened_numel=copied(), arriving_numel=0, first=not out))
    return tuple(out)

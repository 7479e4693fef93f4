"""Which parameters stage 3 still holds gathered when a forward ends: the module trace and the reuse distance.

partitioned_param_coordinator.py records the order in which modules run in the first step (``record_module``) and
from then on releases a module's parameters after its forward only when their next use is far enough along that
trace (``release_sub_module`` -> ``__params_to_release``). The trace is rebuilt here from the parameter names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import accumulate

from zeroest.estimator.core.architecture import ParamTensor
from zeroest.estimator.core.vocab import MAX_REUSE_DISTANCE

_LAYER_INDEX = re.compile(r"\.(?:layers|h|layer|blocks)\.(\d+)\.")


Trace = list[tuple[tuple[str, ...], int]]


def _module_trace(tensors: Sequence[ParamTensor], *, tied: bool, grad_ckpt: bool) -> tuple[Trace, Trace]:
    """The modules with parameters in the order stage 3's coordinator sees them in one forward, and in the backward
    after it, each as (its parameters' names, their numel).

    parameter_offload.py ``_register_deepspeed_module`` hooks every module; ``fetch_sub_module`` records each module
    as its forward, then its backward, begins (``record_module``). A module is the parameter name's prefix, in
    ``named_parameters`` order; a tied lm_head uses the token embedding's weight again after the last module.
    Backward runs the blocks in reverse; with non-reentrant checkpointing a decoder layer's backward begins with
    its recomputed forward (torch/utils/checkpoint.py ``_checkpoint_hook`` unpacks by re-running the layer, whose
    forward hooks fetch again).
    """
    modules: dict[str, list[ParamTensor]] = {}
    for t in tensors:
        modules.setdefault(t.name.rsplit(".", 1)[0], []).append(t)
    entries = [(tuple(t.name for t in ts), sum(t.numel for t in ts)) for ts in modules.values()]
    layers = [_LAYER_INDEX.search(name + ".") for name in modules]
    keys = [m.group(1) if m else None for m in layers]
    if tied:
        embedding = next((t for t in tensors if t.component == "embeddings"), None)
        if embedding is not None:
            entries.append(((embedding.name,), embedding.numel))
            keys.append(None)
    blocks: list[tuple[str | None, Trace]] = []
    for i, (entry, key) in enumerate(zip(entries, keys, strict=True)):
        if key is None or i == 0 or key != keys[i - 1]:
            blocks.append((key, []))
        blocks[-1][1].append(entry)
    backward = [e for key, block in reversed(blocks) for e in (block if grad_ckpt and key else []) + block[::-1]]
    return entries, backward


def reuse_retained_numel(tensors: Sequence[ParamTensor], *, tied: bool, grad_ckpt: bool,
                         persistence_threshold: int, reuse_distance: int = MAX_REUSE_DISTANCE) -> int:
    """Elements of non-persistent parameters still gathered when forward ends because their next use is near.

    partitioned_param_coordinator.py ``release_sub_module`` (forward) frees only the parameters that
    ``__params_to_release`` picks: walking the recorded module trace from the next module on, it keeps every
    parameter met before the walked modules' parameters add up to ``stage3_max_reuse_distance`` R (1e9 by
    default). A parameter used last in forward at trace position k and next at k' stays gathered when
    sum_{k < j < k'} n_j < R (n_j: elements of module j's own parameters, persistent ones included). The lm_head
    (last in forward, first in backward) always stays; without checkpointing a module's distance is about twice the
    elements after it, so the last ~R/2 elements of the model stay gathered into backward. Nothing here caps them
    at ``stage3_max_live_parameters``: that bounds only the prefetch.
    """
    forward, backward = _module_trace(tensors, tied=tied, grad_ckpt=grad_ckpt)
    trace, n_forward = forward + backward, len(forward)
    numel = {t.name: t.numel for t in tensors}
    starts = [0, *accumulate(n for _, n in trace)]
    last_forward: dict[str, int] = {}
    for k, (names, _) in enumerate(trace[:n_forward]):
        for name in names:
            last_forward[name] = k
    next_use: dict[str, int] = {}
    for k in range(len(trace) - 1, n_forward - 1, -1):
        for name in trace[k][0]:
            next_use[name] = k
    return sum(numel[name] for name, k in last_forward.items()
               if numel[name] >= persistence_threshold and name in next_use
               and starts[next_use[name]] - starts[k + 1] < reuse_distance)

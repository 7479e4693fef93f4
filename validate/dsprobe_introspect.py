"""Which DeepSpeed attribute owns each live tensor storage, and which memory category that attribute is.

``walk_storages(engine, model)`` follows every attribute of the engine's optimizer wrapper
(DeepSpeedZeroOptimizer,
DeepSpeedZeroOptimizer_Stage3, BF16_Optimizer, FP16_*Optimizer), its base torch optimizer (``.state``), the
engine,
and each model parameter (``.data``, ``.grad``, ``.ds_tensor``, ``.grad_accum`` ...). A storage reachable from
several places (a parameter that is a view into a flat buffer) is counted once, under the reference that
spans the
most of it. Paths are normalised: list indices dropped, dict keys kept only when they are strings
(``opt.bit16_groups_flat``, ``base.state.exp_avg``).
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

CATEGORIES = (
    "params_16bit",
    "params_fp32_master",
    "optimizer_states",
    "grads_16bit",
    "grads_fp32",
    "reduce_buckets",
    "allgather_buffers",
    "other",
)

# First match wins; the doc (docs/DEEPSPEED_ALLOCATIONS.md) cites the allocating function for each.
CATEGORY_OF: tuple[tuple[str, str], ...] = (
    (r"^base\.state\.step$", "other"),
    (r"^base\.state\.", "optimizer_states"),
    (
        r"^opt\.(bit16_groups_flat|bf16_groups_flat|fp16_groups_flat|fp16_partitioned_groups_flat"
        r"|lp_param_buffer|fp16_groups|bit16_groups|bf16_groups)$",
        "params_16bit",
    ),
    (r"^opt\.param_buffer_of_bit16_for_cpu_offload_groups$", "params_16bit"),
    (r"^opt\.parameter_offload\.persistent_parameters$", "params_16bit"),
    (
        r"^opt\.(single_partition_of_fp32_groups|fp32_groups_flat_partition|fp32_partitioned_groups_flat"
        r"|fp32_groups_flat|fp32_groups)$",
        "params_fp32_master",
    ),
    (
        r"^opt\.(non_expert_gradients|fp32_groups_gradients_flat|fp32_groups_gradients|fp32_groups_gradient_flat_partition"
        r"|fp32_groups_actual_gradients_flat)$",
        "grads_fp32",
    ),
    (r"^opt\.(single_partition_of_fp32_groups|fp32_partitioned_groups_flat)\.grad$", "grads_fp32"),
    (
        r"^opt\.(averaged_gradients|grads_in_partition|all_grad_tensors|grad_partitions_flat_buffer"
        r"|_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition|accumulated_grads_in_cpu"
        r"|temp_grad_buffer_for_cpu_offload|temp_grad_buffer_for_gpu_offload"
        r"|_DeepSpeedZeroOptimizer_Stage3__ipg_bucket_flat_buffer)",
        "grads_16bit",
    ),
    (r"^opt\.ipg_buckets", "reduce_buckets"),
    (r"^param\.grad_accum$", "grads_fp32"),
    (r"^param\.grad$", "grads_16bit"),
    (r"^param\.(data|ds_tensor)$", "params_16bit"),
    # a frozen parameter's stage-3 partition is its own storage (outside ``fp16_partitioned_groups_flat``), often
    # first reached through the coordinator or ``persistent_parameters``
    (r"\.ds_tensor$", "params_16bit"),
)


def category(path: str) -> str:
    """The category of a normalised owner path (``other`` if no rule matches)."""
    for pattern, cat in CATEGORY_OF:
        if re.search(pattern, path):
            return cat
    return "other"


def _walkable(obj: Any) -> bool:
    mod = type(obj).__module__ or ""
    return mod.startswith(("deepspeed", "torch.optim")) and not _is_module(obj)


def _is_module(obj: Any) -> bool:
    import torch

    return isinstance(obj, torch.nn.Module)


def _children(obj: Any) -> list[tuple[str, Any]]:
    import torch

    if isinstance(obj, dict):
        out = []
        for key, value in obj.items():
            label = f".{key}" if isinstance(key, str) else ""
            out.append((label, value))
        return out
    if isinstance(obj, (list, tuple, set, frozenset, deque)):
        return [("", v) for v in obj]
    if isinstance(obj, torch.Tensor):
        out = [(".grad", obj.grad)] if obj.grad is not None else []
        out += [(f".{k}", v) for k, v in vars(obj).items() if isinstance(v, torch.Tensor)]
        return out
    if _walkable(obj):
        try:
            return [(f".{k}", v) for k, v in vars(obj).items()]
        except TypeError:
            return []
    return []


def walk_storages(engine: Any, model: Any, max_depth: int = 7) -> dict[str, int]:
    """Bytes of each distinct CPU storage reachable from the engine and model, summed per owner path."""
    import torch

    refs: dict[int, tuple[int, int, str]] = {}  # storage ptr -> (covered bytes, storage bytes, path)
    seen_objs: set[int] = set()

    def visit(obj: Any, path: str, depth: int) -> None:
        if obj is None or depth > max_depth or isinstance(obj, (str, bytes, int, float, bool)):
            return
        if isinstance(obj, torch.Tensor):
            _note(obj, path)
        if id(obj) in seen_objs:
            return
        seen_objs.add(id(obj))
        for label, child in _children(obj):
            visit(child, path + label, depth + 1)

    def _note(tensor: torch.Tensor, path: str) -> None:
        if tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes == 0:
            return
        covered = tensor.numel() * tensor.element_size()
        key = storage.data_ptr()
        if key not in refs or covered > refs[key][0]:
            refs[key] = (covered, nbytes, path)

    # Order matters on ties (a storage referenced whole from two places keeps the first name): the wrapper's
    # own
    # attributes, then the model's parameters, then the engine, then the base optimizer (param_groups/state).
    opt = engine.optimizer
    base = getattr(engine, "basic_optimizer", None)
    if opt is not base:
        seen_objs.add(id(opt))
        visit({k: v for k, v in vars(opt).items() if k != "optimizer"}, "opt", 0)
    for param in model.parameters():
        visit(param, "param.data", 0)
    for buf in model.buffers():
        visit(buf, "buffer", 0)
    visit(
        {
            k: v
            for k, v in vars(engine).items()
            if k
            not in ("_modules", "_parameters", "_buffers", "optimizer", "basic_optimizer", "client_optimizer")
        },
        "engine",
        0,
    )
    for root in (getattr(opt, "optimizer", None), base):
        if root is not None:
            visit(root, "base", 0)
    owners: dict[str, int] = {}
    for _covered, nbytes, path in refs.values():
        path = re.sub(r"^param\.data\.", "param.", path)
        owners[path] = owners.get(path, 0) + nbytes
    return owners


def categorize(owners: dict[str, int]) -> dict[str, int]:
    """Sum owner bytes per category (every category present, zero if empty)."""
    out = dict.fromkeys(CATEGORIES, 0)
    for path, nbytes in owners.items():
        out[category(path)] += nbytes
    return out

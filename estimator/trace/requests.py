"""The request sequence of a setup (``core.zero0_requests`` at ZeRO stage 0, ``core.requests`` at 1-2,
``core.zero3_requests`` at 3), from its model traced on the meta device, replayed and cached.

The model is built at full depth on meta as the validator trains it (``trace.model.build_trained``: LoRA through
peft, checkpointing), for its parameters in order. Its forward and backward at the setup's micro-batch and sequence
length are recorded (``trace.recorder.run_trace``; at stage 3 with its linear and its module hooks marked,
``trace.zero3_hooks``) on a copy of four decoder layers and rebuilt to full depth
(``trace.sequence.expand``) where the layers are all of one kind, else at full depth. The replay's reserve is kept
on disk beside the activation profiles (``trace.cache``: one small file per setup, keyed by everything the
sequence reads and the library versions), so a setup traced once is read back without torch.
"""

from __future__ import annotations

import logging
import time

from zeroest.estimator.core.allocator import RequestReplay, replay
from zeroest.estimator.core.hf_config import hf_config, layers_key
from zeroest.estimator.core.request_types import ModuleSpec, RequestSpec, TensorSpec
from zeroest.estimator.core.requests import build, update_of
from zeroest.estimator.core.zero0_requests import build0
from zeroest.estimator.core.zero3_requests import build3
from zeroest.estimator.trace import cache

log = logging.getLogger(__name__)

SEQUENCE_VERSION = 10
"""Bumped whenever ``core.requests.build`` or what the trace records changes, so that old files are not read."""
_MEMO: dict[str, RequestReplay] = {}
"""Replays already read or built in this process, by key (the report estimates each row several times)."""


def model_and_trace(config: dict, dtype: str, attn: str, adapters, *, ckpt: bool, micro_batch: int, seq_len: int,
                    cut: bool = True, zero3: bool = False) -> tuple:
    """(the model at full depth on meta, its trace at (``micro_batch``, ``seq_len``), whether the trace was
    expanded): with ``cut``, four decoder layers traced and expanded to full depth where the layers are all of one
    kind, else the full depth traced. ``zero3``: as stage 3 runs it, with its ``torch.nn.functional.linear``
    (``trace.zero3_linear``) and the marks of its module hooks (``trace.zero3_hooks``)."""
    import torch
    from zeroest.estimator.trace.kinds import layout
    from zeroest.estimator.trace.model import build_trained
    from zeroest.estimator.trace.recorder import run_trace
    from zeroest.estimator.trace.sequence import CUT_LAYERS, expand
    from zeroest.estimator.trace.zero3_linear import zero3_linear

    model = build_trained(config, dtype, attn, adapters, grad_ckpt=ckpt, num_layers=None)
    ids = torch.zeros((micro_batch, seq_len), dtype=torch.long, device="meta")
    layer_kinds = layout(model)["kinds"] if cut else []
    with zero3_linear(zero3):
        if cut and len(set(layer_kinds)) == 1 and len(layer_kinds) > CUT_LAYERS:
            short = build_trained(config, dtype, attn, adapters, grad_ckpt=ckpt, num_layers=CUT_LAYERS)
            trace = run_trace(short, ids, grad_ckpt=ckpt, target="cuda", zero3_hooks=zero3)
            return model, expand(trace, CUT_LAYERS, len(layer_kinds), kinds=layer_kinds), True
        return model, run_trace(model, ids, grad_ckpt=ckpt, target="cuda", zero3_hooks=zero3), False


def tensors_of(model) -> tuple[list[TensorSpec], list[int]]:
    """The model's parameters (``named_parameters`` order) and its buffers' bytes."""
    params = [TensorSpec(name, p.numel(), p.element_size(), p.requires_grad) for name, p in model.named_parameters()]
    return params, [b.numel() * b.element_size() for b in model.buffers()]


def module_specs(model) -> list[ModuleSpec]:
    """Every module of the model with its mark key, the names of the parameters ZeRO-3's hooks gather for it (its own;
    a leaf module's, all below it; none inside a leaf, which is not hooked) and of its own (``named_parameters``' name
    of a tied weight)."""
    from zeroest.estimator.trace.zero3_hooks import is_leaf, module_marks

    names = {id(p): name for name, p in model.named_parameters()}
    leaves = [name for name, module in model.named_modules() if is_leaf(module)]
    out = []
    for prefix, k, module, name in module_marks(model):
        inside = any(name.startswith(f"{leaf}.") for leaf in leaves)
        leaf = name in leaves
        params = () if inside else tuple(dict.fromkeys(names[id(p)] for p in module.parameters(recurse=leaf)))
        own = tuple(names[id(p)] for p in module.parameters(recurse=False))
        out.append(ModuleSpec(f"{prefix}{k}", name, params, own=own, hooked=not inside, leaf=leaf))
    return out


def build_sequence(model, trace, spec: RequestSpec):
    """The request sequence of ``model`` (built on meta) and its ``trace``, by the builder of ``spec``'s stage."""
    params, buffers = tensors_of(model)
    if spec.stage == 3:
        return build3(params, buffers, module_specs(model), trace, spec)
    return (build0 if spec.stage == 0 else build)(params, buffers, trace, spec)


def spec_of(setup, *, flatten_on_cpu: bool) -> RequestSpec:
    """The ``RequestSpec`` of a covered setup (``core.requests.sequence_gap``)."""
    z = setup.zero
    return RequestSpec(stage=int(setup.stage), world=setup.world_size,
                       offload=str(setup.zero.offload_optimizer) != "none", loop=str(setup.workload.loop),
                       param_groups=setup.optimizer.param_groups, bucket_elements=int(setup.zero.reduce_bucket_size),
                       flatten_on_cpu=flatten_on_cpu, optimizer=update_of(setup),
                       grad_accum=setup.workload.grad_accum, overlap=setup.zero.overlap,
                       prefetch_elements=int(z.prefetch_bucket_size),
                       persistence_threshold=int(z.param_persistence_threshold), max_live=int(z.max_live_parameters),
                       reuse_distance=int(z.max_reuse_distance), sub_group_size=int(z.sub_group_size),
                       zero_init=bool(z.zero_init) and int(setup.stage) == 3, fp16=str(setup.dtype) == "fp16")


def _key(setup, spec: RequestSpec, config: dict, limit_bytes: int) -> str:
    from zeroest.estimator.trace.tracer import _peft_version, library_versions

    a, w = setup.adapters, setup.workload
    payload = {"what": "zero12-requests", "sequence_version": SEQUENCE_VERSION, "config": config,
               "dtype": str(setup.dtype), "attn": str(w.attn), "ckpt": w.grad_ckpt, "micro_batch": w.micro_batch,
               "seq_len": w.seq_len, "spec": {k: getattr(spec, k) for k in spec.__dataclass_fields__},
               "limit_bytes": limit_bytes, **({"expandable_segments": True} if setup.expandable_segments else {}),
               "lora": {f: getattr(a, f) for f in ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")},
               **library_versions(), **({"peft": _peft_version()} if a.lora else {})}
    return "requests-" + cache.cache_key(payload)


def sequence_replay(setup, *, flatten_on_cpu: bool, limit_bytes: int = 0, use_cache: bool = True) -> RequestReplay:
    """The replayed request sequence of ``setup`` (covered by ``core.requests.sequence_gap``) on the GPU's kernels;
    ``flatten_on_cpu``: DeepSpeed's branch for the card (``core.capacity.flatten_decision``); ``limit_bytes``: what
    the allocator may hold there (``core.allocator.replay``; 0: no card)."""
    config = dict(hf_config(setup.model))
    config[layers_key(config["model_type"])] = setup.model.num_layers
    spec = spec_of(setup, flatten_on_cpu=flatten_on_cpu)
    key = _key(setup, spec, config, limit_bytes)
    if use_cache and key in _MEMO:
        return _MEMO[key]
    path = cache.cache_dir() / f"{key}.json"
    if use_cache:
        try:
            data = cache.read_versioned(path, cache.CACHE_VERSION)
            if data is not None:
                _MEMO[key] = RequestReplay(phases={k: int(v) for k, v in data["phases"].items()},
                                           peak_reserved_bytes=int(data["peak_reserved_bytes"]),
                                           retries=int(data["retries"]), out_of_memory=bool(data["out_of_memory"]))
                return _MEMO[key]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            log.warning(f"ignoring the corrupt request-sequence cache file {path} ({type(err).__name__}: {err}); "
                        "tracing again")
    started = time.perf_counter()
    w = setup.workload
    model, trace, _ = model_and_trace(config, str(setup.dtype), str(w.attn), setup.adapters, ckpt=w.grad_ckpt,
                                      micro_batch=w.micro_batch, seq_len=w.seq_len, zero3=spec.stage == 3)
    result = replay(build_sequence(model, trace, spec), limit_bytes, expandable=setup.expandable_segments)
    log.info(f"built the request sequence of {setup.model.name} in {time.perf_counter() - started:.2f} s")
    if use_cache:
        cache.write_atomically(path, {"version": cache.CACHE_VERSION, "phases": result.phases,
                                      "peak_reserved_bytes": result.peak_reserved_bytes, "retries": result.retries,
                                      "out_of_memory": result.out_of_memory}, "request sequence")
        _MEMO[key] = result
    return result

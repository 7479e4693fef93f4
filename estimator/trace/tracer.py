"""The traced activation profile: run the real HF model on the meta device and count what autograd keeps.

The model is built from its config.json at full depth on ``torch.device("meta")`` in the run's dtype
(``trace.model``; as peft and the freeze patterns leave it for LoRA or frozen weights), its decoder layers are
grouped into kinds (``trace.kinds``: structure, per-layer config entries, whether the layer trains and its input
needs a gradient), and it is cut to a copy holding the first two layers of each kind in the real order. One
forward and backward of the copy is recorded storage by storage (``trace.recorder``, which also says which
attention kernels are mimicked). The second layer of each kind is that kind's steady state, weighted by how
many real layers are of that kind; what the first one saves beyond it (rotary cos/sin shared by all layers, a
mask shared by a kind) goes to the embeddings. A model whose layers are all alike traces 2 layers, as before.

The trace runs at three shapes so that every storage's size becomes a monomial in (micro_batch, seq_len)
(``trace.polys``); the polynomials and the layout are cached on disk (``trace.cache``) and evaluated for any
shape.
"""

from __future__ import annotations

import functools
import logging
import time

from zeroest.estimator.core.hf_config import hf_config, layers_key
from zeroest.estimator.core.profile import ActivationProfile, check_kind
from zeroest.estimator.core.shape import ModelShape
from zeroest.estimator.trace import cache, kinds, polys
from zeroest.estimator.trace.model import build_model, build_trained
from zeroest.estimator.trace.recorder import run_trace

log = logging.getLogger(__name__)

BASE_BATCH, BASE_SEQ = 2, 64
"""The three traces run at (2, 64), (4, 64) and (2, 128) tokens; sliding-window models with a longer sequence
than their window trace at (2, s) instead, so that the same masked kernels run."""


def _regime_seq(config: dict, attn: str, seq_len: int) -> int | None:
    """The base sequence length of the traces: None for the usual (64); ``seq_len`` when an sdpa model with a
    sliding window gets a sequence at least as long as the window (HF then builds an explicit mask:
    masking_utils ``_ignore_causal_mask_sdpa``), so that the masked kernels are the ones traced."""
    window = config.get("sliding_window")
    if attn == "sdpa" and window and seq_len >= window and config.get("use_sliding_window", True):
        return seq_len
    return None


def trace_polys(config: dict, dtype: str, attn: str, *, target: str = "cuda",
                seq_len: int = BASE_SEQ, adapters=None, frozen: frozenset[str] = frozenset(),
                adapters_fp32: bool = False, zero3_linear: bool = False) -> dict:
    """Trace both modes (plain, checkpointed) of the copy that covers every kind of layer, at three shapes on
    meta; fit per-storage monomials; analyze. The entry holds the copy's ``layout`` (``trace.kinds``).

    With ``adapters`` (``core.adapters.Adapters``, not a full fine-tune) each mode traces its own model built
    as the validator trains it (``trace.model.build_trained``: checkpointing before peft, ``frozen`` names
    frozen at full depth, ``adapters_fp32`` for peft's fp32 adapters).
    ``zero3_linear``: traced with stage 3's ``torch.nn.functional.linear`` (``trace.zero3_linear``).
    """
    import torch
    from zeroest.estimator.trace.zero3_linear import zero3_linear as stage3_linear

    config = dict(config)
    if attn == "flash":  # flash-attn handles sliding windows inside the kernel, with no mask tensor
        config.pop("sliding_window", None)
    window = config.get("sliding_window") if attn == "sdpa" else None
    below = min(BASE_SEQ, max(2, (window - 1) // 2)) if window else BASE_SEQ  # 2 * s0 stays under the window
    s0 = _regime_seq(config, attn, seq_len) or below
    b0 = BASE_BATCH
    wrapped = adapters is not None and not adapters.full
    model = None if wrapped else build_model(config, dtype, attn, num_layers=None)
    plan = None if wrapped else kinds.layout(model)
    if model is not None:
        kinds.cut(model, plan)
    entry: dict = {"b0": b0, "s0": s0}
    for mode, ckpt in (("plain", False), ("ckpt", True)):
        if wrapped:
            model = build_trained(config, dtype, attn, adapters, grad_ckpt=ckpt, frozen=frozen, num_layers=None,
                                  adapters_fp32=adapters_fp32)
            plan = plan or kinds.layout(model)  # the same kinds in both modes: hooks change no requires_grad
            kinds.cut(model, plan)
        with stage3_linear(zero3_linear):
            traces = [
                run_trace(model, torch.zeros((b, s), dtype=torch.long, device="meta"), grad_ckpt=ckpt,
                          target=target, force_flash=attn == "flash")
                for b, s in ((b0, s0), (2 * b0, s0), (b0, 2 * s0))
            ]
        if len({len(t.sizes) for t in traces}) != 1:
            raise RuntimeError("traces of different shapes made different numbers of storages: cannot scale")
        terms = polys.fit_terms(traces[0].sizes, traces[1].sizes, traces[2].sizes, b0, s0)
        entry[mode] = polys.analyze(traces[0], terms)
    entry["layout"] = plan
    return entry


_MEMO: dict[str, dict] = {}


@functools.lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """torch's and transformers' versions for the cache key, read from their files without importing them
    (``importlib.metadata`` takes ~25 ms, importing torch seconds)."""
    import importlib.util
    import re
    from pathlib import Path

    versions = {}
    for name, file in (("torch", "version.py"), ("transformers", "__init__.py")):
        spec = importlib.util.find_spec(name)
        text = Path(spec.origin).with_name(file).read_text()[:20000] if spec and spec.origin else ""
        found = re.search(r"^__version__\s*(?::\s*str\s*)?=\s*['\"]([^'\"]+)['\"]", text, re.M)
        if found:
            versions[name] = found.group(1)
        else:
            from importlib.metadata import version

            versions[name] = version(name)
    return versions


def _peft_version() -> str:
    from importlib.metadata import version

    return version("peft")


def _entry(key_payload: dict, name: str, trace, use_cache: bool) -> dict:
    """The cached (memory, then disk) entry for ``key_payload``, or ``trace()``'s, stored."""
    key = cache.cache_key(key_payload)
    entry = (_MEMO.get(key) or cache.load(key)) if use_cache else None
    if entry is None:
        start = time.perf_counter()
        entry = trace()
        log.info(f"traced {name} in {time.perf_counter() - start:.2f} s")
        if use_cache:
            cache.store(key, entry)
            entry = cache.decode(cache.encode(entry))
    _MEMO[key] = entry
    return entry


def traced_profile(shape: ModelShape, micro_batch: int, seq_len: int, dtype: str = "bf16",
                   attn: str = "sdpa", *, target: str = "cuda", config: dict | None = None,
                   use_cache: bool = True, adapters=None, frozen: frozenset[str] | None = None,
                   adapters_fp32: bool = False, zero3_linear: bool = False) -> ActivationProfile:
    """The ``ActivationProfile`` of ``shape`` traced on the meta device (see the module docstring).

    ``config`` is the HF config.json dict (default ``hf_config(shape)``; its depth is the shape's); ``target``
    the device whose kernels are mimicked ("cuda" or "cpu"). Traces are cached on disk (``trace.cache``) keyed
    by config (depth included: it decides how many layers each kind has), dtype, attention, target and library
    versions, as polynomials in (micro_batch, seq_len) with the layout of the layers, so other shapes need no
    new trace; a cached profile is read without importing torch. ``adapters`` (``core.adapters.Adapters``:
    LoRA, frozen weights) traces the model as peft and the freeze patterns leave it (``frozen``: the base weights'
    names at full depth, ``core.adapters.frozen_base_names(shape, adapters)``), with the kinds of layer it makes
    (``trace.kinds``); its key adds the adapters, the frozen names and peft's version, so LoRA and full profiles
    never mix. ``adapters_fp32``: the adapters stay in peft's fp32 (a model built under zero.Init;
    ``trace.model``). ``zero3_linear``: stage 3's linear, which keeps every Linear's input
    (``trace.zero3_linear``); keyed apart, and only for adapters or frozen weights (a full fine-tune's Linears keep
    their inputs either way).
    """
    check_kind(dtype, attn)
    config = dict(config or hf_config(shape))
    config[layers_key(config["model_type"])] = shape.num_layers
    regime = _regime_seq(config, attn, seq_len)
    payload = {"config": config, "dtype": dtype, "attn": attn, "target": target, "regime": regime,
               **library_versions()}
    name = f"{shape.name} ({dtype}, {attn})"
    if adapters is None or adapters.full:
        entry = _entry(payload, name, lambda: trace_polys(config, dtype, attn, target=target, seq_len=seq_len),
                       use_cache)
        return polys.profile_from_polys(entry, micro_batch, seq_len)
    if frozen is None:
        raise ValueError("a traced LoRA or frozen-weight profile needs the frozen names: pass "
                         "frozen=core.adapters.frozen_base_names(shape, adapters)")
    lora = {f: getattr(adapters, f) for f in ("lora_rank", "lora_dropout", "lora_targets", "modules_to_save")}
    key = {**payload, "peft": _peft_version(), "lora": lora,
           "frozen": "all (peft)" if adapters.lora else sorted(frozen),  # peft freezes every base weight
           **({"adapters_fp32": True} if adapters_fp32 and adapters.lora else {}),
           **({"zero3_linear": True} if zero3_linear else {})}
    entry = _entry(key, f"{name[:-1]}, trained)",
                   lambda: trace_polys(config, dtype, attn, target=target, seq_len=seq_len, adapters=adapters,
                                       frozen=frozen, adapters_fp32=adapters_fp32, zero3_linear=zero3_linear),
                   use_cache)
    return polys.profile_from_polys(entry, micro_batch, seq_len)

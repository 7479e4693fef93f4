"""Which activation profile a prediction uses: the traced one when torch can run, else the closed form.

``activation_profile`` returns an ``ActivationProfile`` (``core.profile``) and where it came from: traced on the
meta device (``trace.tracer.traced_profile``, imported only on that path, since it needs torch and
transformers) or written as formulas (``core.closed_form.closed_form_profile``). A model the tracer cannot run
falls back to the closed form with one warning.
"""

from __future__ import annotations

import logging

from zeroest.estimator.core.adapters import Adapters, frozen_base_names
from zeroest.estimator.core.closed_form import closed_form_profile
from zeroest.estimator.core.closed_form_gemma import GEMMA_FAMILIES
from zeroest.estimator.core.profile import ActivationProfile
from zeroest.estimator.core.shape import ModelShape

log = logging.getLogger(__name__)


def tracer_available(adapters: Adapters | None = None) -> bool:
    """torch and transformers (and peft for LoRA) can be imported: a trace can run."""
    import importlib.util

    names = ("torch", "transformers", *(("peft",) if adapters is not None and adapters.lora else ()))
    return all(importlib.util.find_spec(name) is not None for name in names)


def activation_profile(shape: ModelShape, micro_batch: int, seq_len: int, dtype: str = "bf16",
                       attn: str = "sdpa", mode: str = "auto",
                       config: dict | None = None, target: str = "cuda",
                       adapters: Adapters | None = None,
                       adapters_fp32: bool = False, zero3_linear: bool = False) -> tuple[ActivationProfile, str]:
    """The profile and where it came from ("traced", "closed-form", or "closed-form (trace failed: ...)").

    ``mode``: "traced" runs the HF model on the meta device (``trace.tracer``), "closed-form" uses the
    formulas, "auto" traces when torch and transformers can be imported, but for a full fine-tune of gemma2 or
    gemma3_text, whose closed form sums the layers over their types where the trace repeats one layer (and
    equals a full-depth trace: tests/test_gemma_closed_form.py). A model the tracer cannot run falls
    back to the closed form with a one-line warning. ``target`` ("cuda" or "cpu") is the device whose attention
    kernels the trace mimics. ``adapters`` (``core.adapters.Adapters``: LoRA, frozen weights) profiles the model
    as it trains; None or a full fine-tune gives the full fine-tune's profile. ``adapters_fp32``: the LoRA
    adapters stay in peft's fp32, as in a model built under zero.Init (``trace.model.build_trained``).
    ``zero3_linear``: ZeRO-3's ``torch.nn.functional.linear``, which keeps every Linear's input
    (``trace.zero3_linear``); it changes only a model with frozen Linears (LoRA, ``--freeze``).
    """
    if mode not in ("auto", "traced", "closed-form"):
        raise ValueError(f"unknown activation mode {mode!r}: use auto, traced or closed-form")
    exact = shape.family in GEMMA_FAMILIES and (adapters is None or adapters.full)  # its layer types summed
    if mode == "closed-form" or (mode == "auto" and (exact or not tracer_available(adapters))):
        profile = closed_form_profile(shape, micro_batch, seq_len, dtype, attn, config, adapters=adapters,
                                      adapters_fp32=adapters_fp32, zero3_linear=zero3_linear)
        return profile, "closed-form"
    if not tracer_available(adapters):
        raise ValueError(
            "traced activations need torch and transformers (and peft for LoRA): install zeroest[validate], "
            "or use --activations closed-form"
        )
    from zeroest.estimator.trace.tracer import traced_profile

    frozen = None if adapters is None or adapters.full else frozen_base_names(shape, adapters)
    try:
        return traced_profile(shape, micro_batch, seq_len, dtype, attn, config=config, target=target,
                              adapters=adapters, frozen=frozen, adapters_fp32=adapters_fp32,
                              zero3_linear=zero3_linear), "traced"
    except Exception as err:  # noqa: BLE001 (any failure of a third-party model falls back, with a warning)
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:160]
        log.warning(f"could not trace {shape.name} ({reason}); using the closed-form activation profile")
        return closed_form_profile(
            shape, micro_batch, seq_len, dtype, attn, config, adapters=adapters, adapters_fp32=adapters_fp32,
            zero3_linear=zero3_linear), f"closed-form (trace failed: {reason})"

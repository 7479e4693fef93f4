"""Shared helpers of the plan tests (no tests here).

Until ``estimator/activations.py`` lands, ``install_fake_activations`` puts a closed-form stand-in in its
place so ``estimate()`` imports; once the real module exists it does nothing. Every plan test derives its
expectations from ``estimate()`` itself, so none depends on the stand-in's numbers.
"""

from __future__ import annotations

import importlib
import sys
import types
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class FakeActivationProfile:
    """Korthikanti et al. 2022 (arXiv 2205.05198) Table 2 style: per-layer bytes linear in micro-batch x seq.
    """

    layer_bytes: int
    layer_input_bytes: int
    logits_bytes: int
    num_layers: int

    def forward_peak_bytes(self, ckpt: bool) -> int:
        kept = self.layer_input_bytes if ckpt else self.layer_bytes
        return self.num_layers * kept + self.logits_bytes

    def backward_peak_bytes(self, ckpt: bool) -> int:
        return self.forward_peak_bytes(ckpt) + (self.layer_bytes if ckpt else 0) + self.logits_bytes

    def backward_live_after_layers(self, layers_done: int, ckpt: bool) -> int:
        kept = self.layer_input_bytes if ckpt else self.layer_bytes
        return (self.num_layers - layers_done) * kept


def _fake_profile(model, micro_batch, seq_len, dtype, attn, mode="auto"):
    b = 4 if dtype == "fp32" else 2
    tokens = micro_batch * seq_len
    h = model.hidden_size
    quadratic = 5 * model.num_heads * seq_len * tokens if attn == "eager" else 0
    return FakeActivationProfile(
        layer_bytes=b * 17 * tokens * h + quadratic,
        layer_input_bytes=b * tokens * h,
        logits_bytes=(b + 4) * tokens * model.vocab_size,
        num_layers=model.num_layers,
    ), "closed-form"


def install_fake_activations() -> bool:
    """Install the stand-in if ``zeroest.estimator.activations`` does not exist; True if installed."""
    name = "zeroest.estimator.activations"
    try:
        real = importlib.import_module(name)
        if hasattr(real, "activation_profile"):
            return False
    except Exception:  # noqa: BLE001 - a half-written module must not stop the plan tests
        pass
    module = types.ModuleType(name)
    module.ActivationProfile = FakeActivationProfile
    module.activation_profile = _fake_profile
    sys.modules[name] = module
    return True

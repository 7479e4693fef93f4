"""gemma2 and gemma3 (text) on the core path: parameter tensors and activations written out, checked against
transformers itself.

Parameters: ``AutoModelForCausalLM.from_config`` on the meta device (``trace.generic.meta_param_tensors``), name by
name. Activations: the live bytes of one forward and backward of the *full-depth* model on meta, recorded storage
by storage (``trace.recorder.run_trace``, the tracer's own recorder): the bytes live when forward ends, and the
peaks of forward and backward, parameter gradients left out. The 2-layer traced profile repeats one layer; where
the two layers are of one type and the model's layers are too, the closed form's saved terms equal it field by
field.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from zeroest.estimator.catalog.models import load_model
from zeroest.estimator.core.architecture import count_params, param_tensors, shape_from_config
from zeroest.estimator.core.closed_form import closed_form_profile
from zeroest.estimator.core.estimate import estimate

from zeroest.api import build_setup

_TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4, vocab_size=300)
_WIDE = dict(hidden_size=96, intermediate_size=256, num_attention_heads=6, num_hidden_layers=7)
PARAMS = {
    "gemma2-defaults": dict(_TINY, model_type="gemma2"),
    "gemma2-gqa-untied": dict(_TINY, model_type="gemma2", num_key_value_heads=2, head_dim=32,
                              tie_word_embeddings=False),
    "gemma2-mqa-bias": dict(_TINY, model_type="gemma2", num_key_value_heads=1, head_dim=16, attention_bias=True),
    "gemma3-defaults": dict(_TINY, model_type="gemma3_text"),
    "gemma3-gqa-untied-bias": dict(_TINY, model_type="gemma3_text", num_key_value_heads=2, head_dim=32,
                                   tie_word_embeddings=False, attention_bias=True),
    "gemma3-mha-7-layers": dict(_TINY, model_type="gemma3_text", num_key_value_heads=4, head_dim=16,
                                num_hidden_layers=7),
}


def _torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_tensors_equal_the_meta_model(name):
    """Names, order, numel and component of every tensor equal ``named_parameters()`` of the model on meta (tied
    lm_head once); each Linear's (out, in) is the real module's; the totals differ by zero."""
    _torch()
    from zeroest.estimator.trace.generic import component_of, meta_model

    config = PARAMS[name]
    model = meta_model(config)
    real = [(n, p.numel(), component_of(n)) for n, p in model.named_parameters()]
    shape = shape_from_config(config, name)
    assert [(t.name, t.numel, t.component) for t in param_tensors(shape)] == real
    assert count_params(shape).total - sum(n for _, n, _ in real) == 0
    linears = {f"{n}.weight": (m.out_features, m.in_features) for n, m in model.named_modules()
               if type(m).__name__ == "Linear"}
    assert all(t.linear_shape == linears.get(t.name) for t in param_tensors(shape))


def test_parameter_count_from_named_terms():
    """gemma3, untied, GQA with bias: embedding and lm_head V*h, per layer q/k/v/o with biases, two head_dim norms,
    three MLP matrices and four h-wide norms, and the final norm."""
    V, h, i, L, qd, kd, d = 300, 64, 160, 3, 4 * 32, 2 * 32, 32  # noqa: N806 (the formulas' symbols)
    layer = (h * qd + qd) + 2 * (h * kd + kd) + (qd * h + h) + 2 * d + 3 * h * i + 4 * h
    shape = shape_from_config(PARAMS["gemma3-gqa-untied-bias"], "g3")
    assert count_params(shape).total == 2 * V * h + L * layer + h
    assert (shape.num_kv_heads, shape.max_positions) == (2, 131072)


def _full_depth(config: dict, b: int, s: int, attn: str, ckpt: bool) -> dict[str, int]:
    """Live activation bytes of one step of the whole model on meta: at the end of forward, and the peaks of
    forward and backward (parameter gradients excluded, as the profile excludes them)."""
    torch = _torch()
    from zeroest.estimator.trace.model import build_model
    from zeroest.estimator.trace.recorder import run_trace

    cfg = {k: v for k, v in config.items() if not (attn == "flash" and k == "sliding_window")}
    model = build_model(cfg, "bf16", attn, device="meta", num_layers=None)
    trace = run_trace(model, torch.zeros((b, s), dtype=torch.long, device="meta"), grad_ckpt=ckpt,
                      force_flash=attn == "flash")
    at = {i: name for name, i in trace.marks.items()}
    live, phase, out = 0, None, {"fwd_peak": 0, "bwd_peak": 0}
    for index, event in enumerate([*trace.events, None]):
        mark = at.get(index)
        if mark in ("fwd_start", "bwd_start"):
            phase = mark[:3]
        elif mark == "fwd_end":
            phase, out["fwd_end"] = None, live
        if event is None:
            break
        serial = event if event >= 0 else ~event
        if serial not in trace.excluded:
            live += trace.sizes[serial] if event >= 0 else -trace.sizes[serial]
        if phase and event >= 0:
            out[f"{phase}_peak"] = max(out[f"{phase}_peak"], live)
    return out


ACTS = [  # (family config, b, s, attention)
    ("gemma2-eager", dict(_TINY, model_type="gemma2", num_key_value_heads=2, head_dim=32), 2, 64, "eager"),
    ("gemma2-wide-eager", dict(_TINY, model_type="gemma2", **{**_WIDE, "num_hidden_layers": 4},
                               num_key_value_heads=3, head_dim=16), 1, 128, "eager"),
    ("gemma3-eager-softcap", dict(_TINY, model_type="gemma3_text", **_WIDE, num_key_value_heads=2, head_dim=48,
                                  final_logit_softcapping=30.0), 1, 128, "eager"),
    ("gemma3-sdpa-below-window", dict(_TINY, model_type="gemma3_text", num_key_value_heads=2, head_dim=32,
                                      sliding_window_pattern=2), 2, 16, "sdpa"),
    ("gemma3-sdpa-masked", dict(_TINY, model_type="gemma3_text", **_WIDE, num_key_value_heads=2, head_dim=48,
                                sliding_window=32), 2, 64, "sdpa"),
    ("gemma3-flash", dict(_TINY, model_type="gemma3_text", num_key_value_heads=2, head_dim=32, sliding_window=16,
                          sliding_window_pattern=2), 2, 32, "flash"),
    ("gemma3-mqa-sdpa-masked", dict(_TINY, model_type="gemma3_text", num_key_value_heads=1, head_dim=32,
                                    sliding_window=32, sliding_window_pattern=2), 2, 64, "sdpa"),
]
_REAL = dict(head_dim=256, query_pre_attn_scalar=256, hidden_activation="gelu_pytorch_tanh")
REAL_WIDTHS = [  # the published widths and vocabularies, fewer layers
    ("gemma-2-2b", dict(_REAL, model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=3,
                        num_attention_heads=8, num_key_value_heads=4, vocab_size=256000, sliding_window=4096,
                        final_logit_softcapping=30.0, attn_logit_softcapping=50.0), 2, 512, "eager"),
    ("gemma-3-1b", dict(_REAL, model_type="gemma3_text", hidden_size=1152, intermediate_size=6912,
                        num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=1, vocab_size=262144,
                        sliding_window=512, sliding_window_pattern=6), 2, 1024, "sdpa"),
]


@pytest.mark.parametrize(("config", "b", "s", "attn"), [
    *(pytest.param(*a[1:], id=a[0]) for a in ACTS),
    *(pytest.param(*a[1:], id=a[0], marks=pytest.mark.slow) for a in REAL_WIDTHS)])
def test_closed_form_equals_a_full_depth_trace(config, b, s, attn):
    """Forward's end equals the whole model's live bytes (within the 8 bytes of the padded labels' row);
    the peaks are never under it and at most 2% over (the per-layer terms are the larger layer type's)."""
    shape = shape_from_config(config, "g")
    profile = closed_form_profile(shape, b, s, "bf16", attn, config)
    for ckpt in (False, True):
        real = _full_depth(config, b, s, attn, ckpt)
        assert profile.forward_end_bytes(ckpt) == pytest.approx(real["fwd_end"], abs=8 * b)
        for key, ours in (("fwd_peak", profile.forward_peak_bytes(ckpt)),
                          ("bwd_peak", profile.backward_peak_bytes(ckpt))):
            assert real[key] - 8 * b <= ours <= real[key] * 1.02, (key, ckpt)


_SAVED = ("embedding_saved_bytes", "layer_saved_bytes", "all_layers_saved_bytes", "head_saved_bytes",
          "logits_bytes", "grad_logits_bytes", "grad_hidden_bytes", "backward_head_transient_bytes",
          "ckpt_layer_saved_bytes")


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_saved_terms_equal_the_traced_profile_when_all_layers_are_alike(attn, tmp_path, monkeypatch):
    """gemma3 with every layer sliding (3 layers, ``layer_types`` given as Hub configs give it; the 2-layer trace
    takes the first two): the trace is faithful, and each saved term and the head's transient equal it exactly."""
    _torch()
    from zeroest.estimator.trace import tracer

    monkeypatch.setenv("ZEROEST_CACHE_DIR", str(tmp_path))
    config = dict(_TINY, model_type="gemma3_text", num_key_value_heads=2, head_dim=32, final_logit_softcapping=30.0,
                  layer_types=["sliding_attention"] * 3)
    shape = shape_from_config(config, "g3")
    for b, s in ((2, 64), (1, 256)):
        traced = tracer.traced_profile(shape, b, s, "bf16", attn, config=config, use_cache=False)
        closed = closed_form_profile(shape, b, s, "bf16", attn, config)
        assert {f: getattr(closed, f) for f in _SAVED} == {f: getattr(traced, f) for f in _SAVED}


def test_gemma2_layer_is_gemma_plus_named_terms():
    """Eager gemma2 saves per layer what a gemma layer of the same widths saves, plus its two post norms (fp32
    upcast 4T*h, rstd 4T, normalized 4T*h, 1 + weight 4h each) and the softcap's tanh output p*b*a*s^2; its head
    keeps the logits' tanh output p*T*V more."""
    b, s, p, h, a, V = 2, 128, 2, 64, 4, 300  # noqa: N806 (the formulas' symbols)
    T = b * s  # noqa: N806
    config = dict(_TINY, model_type="gemma2", num_key_value_heads=2, head_dim=32)
    ours = closed_form_profile(shape_from_config(config, "g2"), b, s, "bf16", "eager", config)
    gemma = dict(config, model_type="gemma")
    base = closed_form_profile(shape_from_config(gemma, "g"), b, s, "bf16", "eager", gemma)
    assert ours.layer_saved_bytes - base.layer_saved_bytes == 2 * (8 * T * h + 4 * T + 4 * h) + p * b * a * s * s
    assert ours.head_saved_bytes - base.head_saved_bytes == p * T * V
    assert ours.all_layers_saved_bytes == 3 * ours.layer_saved_bytes


def test_gemma3_sums_its_layer_types():
    """sdpa past the window: a sliding layer holds k and v repeated to all heads (2p*T*(q_w - kv_w) more) and the
    additive mask p*b*s^2; pattern 2 over 4 layers is two of each."""
    b, s, p = 2, 64, 2
    config = dict(_TINY, model_type="gemma3_text", num_key_value_heads=2, head_dim=32, sliding_window=32,
                  sliding_window_pattern=2, num_hidden_layers=4)
    profile = closed_form_profile(shape_from_config(config, "g3"), b, s, "bf16", "sdpa", config)
    full = closed_form_profile(shape_from_config(dict(config, sliding_window_pattern=1), "g3"), b, s, "bf16", "sdpa",
                               dict(config, sliding_window_pattern=1))
    sliding = full.layer_saved_bytes + 2 * p * b * s * (4 * 32 - 2 * 32) + p * b * s * s
    assert profile.layer_saved_bytes == sliding
    assert profile.all_layers_saved_bytes == 2 * sliding + 2 * full.layer_saved_bytes


@pytest.mark.parametrize(("config", "attn", "match"), [
    (dict(_TINY, model_type="gemma3", text_config={}), "eager", "text_config"),
    (dict(_TINY, model_type="gemma2"), "sdpa", "--attn eager or flash"),
])
def test_one_line_errors(config, attn, match):
    with pytest.raises(ValueError, match=match) as err:
        closed_form_profile(shape_from_config(config, "m.json"), 1, 16, "bf16", attn, config)
    assert "\n" not in str(err.value)


_NO_TORCH = """
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "deepspeed"):
            raise ImportError(f"{name} blocked")
sys.meta_path.insert(0, Block())
import importlib.util
real = importlib.util.find_spec
importlib.util.find_spec = lambda n, *a: None if n.split(".")[0] in ("torch", "transformers", "deepspeed") \\
    else real(n, *a)
from zeroest.api import build_setup
from zeroest.estimator.catalog.models import load_model
from zeroest.estimator.core.estimate import estimate
out = {}
for path in sys.argv[1:]:
    shape = load_model(path)
    est = estimate(build_setup(shape, {"stage": 3, "world_size": 4, "attn": "eager", "seq_len": 512}))
    out[shape.family] = [est.peak_allocated_bytes, est.activation_source]
out["heavy"] = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "deepspeed"))
print(json.dumps(out))
"""


def test_core_install_predicts_gemma2_and_gemma3_without_torch(tmp_path):
    """With torch, transformers and deepspeed unimportable, a gemma2 and a gemma3_text config.json predict (stage
    3, N_d 4) from the closed forms, and the estimate is the one the full install gives."""
    paths = []
    for family in ("gemma2", "gemma3_text"):
        path = tmp_path / f"{family}.json"
        path.write_text(json.dumps(dict(_TINY, model_type=family, num_key_value_heads=2, head_dim=32)))
        paths.append(str(path))
    env = {**os.environ, "ZEROEST_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", _NO_TORCH, *paths], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result.pop("heavy") == []
    for path in paths:
        shape = load_model(path)
        est = estimate(build_setup(shape, {"stage": 3, "world_size": 4, "attn": "eager", "seq_len": 512}))
        assert result[shape.family] == [est.peak_allocated_bytes, "closed-form"]


def test_explain_offers_no_sdpa_to_gemma2():
    """gemma2 runs eager or flash only: --explain re-estimates no sdpa knob for it (an eager gemma3 gets one),
    and each knob it offers estimates."""
    from zeroest.estimator.plan.explain import knob_changes, knobs

    for family, offered in (("gemma2", False), ("gemma3_text", True)):
        shape = shape_from_config(dict(_TINY, model_type=family, num_key_value_heads=2, head_dim=32), family)
        est = estimate(build_setup(shape, {"stage": 2, "world_size": 2, "attn": "eager", "seq_len": 256}))
        assert ("sdpa attention" in {name for name, _ in knob_changes(est.setup)}) is offered
        assert len(knobs(est)) == len(knob_changes(est.setup))

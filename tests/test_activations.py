"""Activation profile: closed form (Korthikanti Table 2 adapted), meta-device trace, and real CPU runs.

Expectations come from named terms: Table 2 of arXiv 2205.05198 plus the HF differences the closed form names,
the bytes autograd really saves in a real CPU run (``saved_tensors_hooks``), and live bytes of a real CPU
forward+backward measured by ``validate.memtrack.LiveBytes``.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os

import pytest
from zeroest.estimator.core.activations import activation_profile
from zeroest.estimator.core.architecture import shape_from_config
from zeroest.estimator.core.closed_form import closed_form_profile
from zeroest.estimator.core.profile import ActivationProfile
from zeroest.estimator.trace import polys, recorder, tracer
from zeroest.estimator.trace.model import build_model, set_checkpointing

B, S = 2, 16
"""The real CPU runs' micro-batch and sequence length."""
TINY = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=300),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=300, sliding_window=4096),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=300),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=3, n_head=4, vocab_size=300, n_positions=128,
                 bos_token_id=0, eos_token_id=0),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                     num_attention_heads=4, vocab_size=300),
    "opt": dict(model_type="opt", hidden_size=64, ffn_dim=256, num_hidden_layers=3, num_attention_heads=4,
                vocab_size=300, word_embed_proj_dim=64, max_position_embeddings=128),
    "phi3": dict(model_type="phi3", hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=300, pad_token_id=0,
                 eos_token_id=0),
    "gemma": dict(model_type="gemma", hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=32, vocab_size=300),
}
LAYERNORM = {"gpt2": 2, "gpt_neox": 1, "opt": 2}
"""LayerNorm calls per layer that save their own mean and rstd (gpt_neox's two norms share one input)."""
def lane(values, keep: int, ids=None):
    """The first ``keep`` cases run in the fast lane, the rest only in the full suite (marked slow)."""
    out = []
    for i, value in enumerate(values):
        args = value if isinstance(value, tuple) else (value,)
        marks = () if i < keep else (pytest.mark.slow,)
        out.append(pytest.param(*args, marks=marks, id=None if ids is None else ids[i]))
    return out


PRESETS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "data", "models", "*.json")))


def _shape(name: str, config: dict):
    return shape_from_config(config, name)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Every test traces into its own cache directory."""
    monkeypatch.setenv("ZEROEST_CACHE_DIR", str(tmp_path / "profiles"))
    monkeypatch.setattr(tracer, "_MEMO", {})


# -- the dataclass
# ----------------------------------------------------------------------------------------------
def _profile(**overrides) -> ActivationProfile:
    values = dict(
        embedding_saved_bytes=10, ckpt_embedding_saved_bytes=12, layer_saved_bytes=100,
        ckpt_layer_saved_bytes=8,
        all_layers_saved_bytes=400, ckpt_all_layers_saved_bytes=32, head_saved_bytes=50, logits_bytes=20,
        loss_transient_bytes=40, layer_forward_transient_bytes=30, ckpt_layer_forward_transient_bytes=90,
        grad_logits_bytes=20, backward_head_transient_bytes=60, grad_hidden_bytes=8,
        layer_backward_transient_bytes=35, ckpt_layer_backward_transient_bytes=25,
    )
    return ActivationProfile(**{**values, **overrides})


def test_properties_add_the_named_terms():
    p = _profile()
    assert p.num_layers == 4
    assert p.forward_end_bytes(False) == 10 + 400 + 50 + 20
    assert p.forward_end_bytes(True) == 12 + 32 + 50 + 20
    assert p.forward_peak_bytes(False) == 410 + max(30, 50 + 20 + 40)
    assert p.forward_peak_bytes(True) == 44 + max(90, 50 + 20 + 40)
    assert p.backward_peak_bytes(False) == 410 + max(50 + 20 + 60, 35)
    assert p.backward_peak_bytes(True) == 44 + max(50 + 20 + 60, p.recompute_bytes + 25)
    assert p.recompute_bytes == p.layer_saved_bytes
    assert p.backward_live_after_layers(0, False) == 410 + 8
    assert p.backward_live_after_layers(3, False) == 410 - 3 * 100 + 8
    assert p.backward_live_after_layers(9, True) == 44 - 4 * 8 + 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.layer_saved_bytes = 0


# -- closed form against Table 2
# ---------------------------------------------------------------------------------
def test_gpt2_eager_is_table2_plus_named_hf_terms():
    """GPT-2 eager with dropout is the paper's GPT: sbh(34 + 5as/h), plus what HF saves beyond it: the Python
    tanh-GELU keeps 5 tensors of s*b*4h (40sbh) where Table 2 counts 16sbh, and each LayerNorm keeps fp32 mean
    and rstd (8sb); its inputs, outputs, q/k/v, the three attention-probability terms and masks are
    Table 2's."""
    config = dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257)
    b, s, h, a = 4, 1024, 768, 12
    profile = closed_form_profile(_shape("gpt2", config), b, s, "bf16", "eager", config)
    table2 = s * b * h * (34 + 5 * a * s // h)
    assert profile.layer_saved_bytes == table2 + 24 * s * b * h + 2 * 8 * s * b


def test_llama_sdpa_layer_from_named_terms():
    """Llama with GQA and sdpa: two RMSNorms (fp32 input 4sbh, rstd 4sb, cast p*sbh, output p*sbh), q and the
    output (a*d wide), k and v (kv wide), fp32 logsumexp 4bas and two int64 RNG scalars, four MLP tensors."""
    config = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
    b, s, h, a, kd, i, p = 2, 4096, 4096, 32, 1024, 14336, 2
    t = b * s
    profile = closed_form_profile(_shape("llama", config), b, s, "bf16", "sdpa", config)
    norms = 2 * ((4 + 2 * p) * t * h + 4 * t)
    attention = 2 * p * t * h + 2 * p * t * kd + 4 * b * a * s + 16
    assert profile.layer_saved_bytes == norms + attention + 4 * p * t * i
    assert profile.ckpt_layer_saved_bytes == p * t * h
    assert profile.logits_bytes == profile.grad_logits_bytes == p * t * 128256
    assert profile.all_layers_saved_bytes == 32 * profile.layer_saved_bytes


def test_eager_saves_probabilities_quadratic_in_seq_len():
    """Eager llama: q, the repeated k and v and the output copy (4 * p*sbh) replace sdpa's terms, and the
    softmax keeps fp32 probabilities and their cast to p: (4 + p) * b*a*s^2 (Table 2's 5as^2b: 2 + 1 + 2)."""
    config = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
    shape, p, h, a, i = _shape("llama", config), 2, 4096, 32, 14336
    for b, s in ((1, 2048), (2, 4096)):
        t = b * s
        eager = closed_form_profile(shape, b, s, "bf16", "eager", config).layer_saved_bytes
        norms = 2 * ((4 + 2 * p) * t * h + 4 * t)
        assert eager == norms + 4 * p * t * h + (4 + p) * b * a * s * s + 4 * p * t * i
        sdpa = [closed_form_profile(shape, b, n, "bf16", "sdpa", config).layer_saved_bytes
                for n in (s, 2 * s)]
        assert sdpa[1] - 16 == 2 * (sdpa[0] - 16)  # linear in s but for the two RNG scalars


def test_bad_input_is_a_value_error():
    shape = _shape("llama", TINY["llama"])
    with pytest.raises(ValueError, match="attention"):
        closed_form_profile(shape, 1, 16, "bf16", "paged")
    with pytest.raises(ValueError, match="dtype"):
        closed_form_profile(shape, 1, 16, "int8", "sdpa")
    with pytest.raises(ValueError, match="activation mode"):
        activation_profile(shape, 1, 16, mode="guess")


def test_closed_form_mode_needs_no_torch():
    profile, source = activation_profile(_shape("llama", TINY["llama"]), 2, 16, mode="closed-form")
    assert source == "closed-form"
    assert profile.layer_saved_bytes > 0


# -- the tracer against real CPU runs
# -----------------------------------------------------------------------------
def _torch():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return torch


def _layernorm_calls(family: str, layers: int) -> int:
    """LayerNorm calls in the model (two per layer and the final one) for the LayerNorm families, else 0."""
    return 2 * layers + 1 if family in ("gpt2", "gpt_neox", "opt") else 0


def _real_model(config: dict, attn: str, grad_ckpt: bool = False):
    torch = _torch()
    torch.manual_seed(0)
    model = build_model(config, "bf16", attn, device="cpu", num_layers=None)
    set_checkpointing(model, grad_ckpt)
    return model, torch.randint(0, config["vocab_size"], (B, S))


def saved_bytes_of_forward(model, ids) -> int:
    """Bytes of the distinct storages autograd saves in one real forward of ``model`` (weights and buffers left
    out)."""
    torch = _torch()
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids, use_cache=False)
    return sum(saved.values())


def _real_saved_bytes(config: dict, attn: str) -> int:
    """Bytes autograd saves in a real CPU forward of the config's model."""
    return saved_bytes_of_forward(*_real_model(config, attn))


@pytest.mark.parametrize("family", lane(list(TINY), 2, ids=list(TINY)))
def test_traced_saved_bytes_equal_what_autograd_saves_on_cpu(family):
    """The meta trace (CPU kernels) of a 2-layer copy, extrapolated to 3 layers, counts exactly the bytes a
    real CPU run saves; CPU LayerNorm keeps mean and rstd in bf16 (2 + 2 bytes a token) where meta and CUDA
    keep fp32 (4 + 4), the one named difference."""
    _torch()
    config = TINY[family]
    regions = tracer.trace_polys(config, "bf16", "sdpa", target="cpu")["plain"]["regions"]
    at = {name: polys.evaluate(poly, B, S) for name, poly in regions.items()}
    traced = at["embed"] + at["layer0"] + 2 * at["layer1"] + at["head"] + at["loss"]
    assert traced - _real_saved_bytes(config, "sdpa") == _layernorm_calls(family, 3) * 4 * B * S


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_traced_eager_saved_bytes_equal_a_real_cpu_run(family):
    _torch()
    config = TINY[family]
    regions = tracer.trace_polys(config, "bf16", "eager", target="cpu")["plain"]["regions"]
    at = {name: polys.evaluate(poly, B, S) for name, poly in regions.items()}
    traced = at["embed"] + at["layer0"] + 2 * at["layer1"] + at["head"] + at["loss"]
    assert traced - _real_saved_bytes(config, "eager") == _layernorm_calls(family, 3) * 4 * B * S


def _live_bytes_class():
    from zeroest.validate.memtrack import LiveBytes

    class EventBytes(LiveBytes):
        """LiveBytes that also logs each storage's birth (serial) and death (~serial) for a replay."""

        def __post_init__(self) -> None:
            super().__post_init__()
            self.log: list[int] = []
            self.serials: dict[int, int] = {}
            self.sizes: list[int] = []

        def _track(self, tensor) -> None:
            key = id(tensor.untyped_storage())
            if (self.device is None or tensor.device.type == self.device) and key not in self._seen:
                self.serials[key] = len(self.sizes)
                self.sizes.append(tensor.untyped_storage().nbytes())
                self.log.append(self.serials[key])
            super()._track(tensor)

        def _release(self, key: int) -> None:
            if key in self._seen:
                self.log.append(~self.serials[key])
            super()._release(key)

    return EventBytes


def _measure(config: dict, attn: str, grad_ckpt: bool, built=None) -> dict[str, int]:
    """Live bytes of a real CPU step (weights adopted first), replayed without the parameter gradients: at the
    end of forward, the forward peak, and the backward peak after the output has been dropped. ``built``:
    (model, ids) to run instead of the plain model."""
    model, ids = built or _real_model(config, attn, grad_ckpt)
    meter = _live_bytes_class()(device="cpu")
    meter.adopt([*model.parameters(), *model.buffers()])
    grads: list = []
    for param in model.parameters():
        if param.requires_grad:
            param.register_hook(grads.append)
    with meter:
        first = len(meter.sizes)
        meter.adopt([ids])
        out = model(input_ids=ids, labels=ids, use_cache=False)
        fwd_end = len(meter.log)
        recorder.param_grad_hooks(out.loss, grads.append)
        loss = out.loss
        del out
        bwd_start = len(meter.log)
        loss.backward()
    grads += [p.grad for p in model.parameters() if p.grad is not None]
    skip = {meter.serials.get(id(g.untyped_storage())) for g in grads}
    live, peak, marks = 0, 0, {}
    for index, event in enumerate(meter.log):
        if index == fwd_end:
            marks["forward_end"], marks["forward_peak"] = live, peak
        if index == bwd_start:
            peak = live
        serial = event if event >= 0 else ~event
        size = 0 if serial in skip or serial < first else meter.sizes[serial]
        live += size if event >= 0 else -size
        peak = max(peak, live)
    marks["backward_peak"] = peak
    return marks


@pytest.mark.parametrize("grad_ckpt", [False, True], ids=["plain", "ckpt"])
@pytest.mark.parametrize("family", lane(list(TINY), 2, ids=list(TINY)))
def test_profile_matches_live_bytes_of_a_real_cpu_step(family, grad_ckpt):
    """forward_end, forward_peak and backward_peak of the traced profile (meta, CPU kernels, 2 layers traced,
    3 extrapolated) against LiveBytes on a real 3-layer CPU step, parameter gradients excluded: within 2%."""
    _torch()
    config = TINY[family]
    profile = polys.profile_from_polys(tracer.trace_polys(config, "bf16", "sdpa", target="cpu"), B, S)
    measured = _measure(config, "sdpa", grad_ckpt)
    for name, value in measured.items():
        assert getattr(profile, f"{name}_bytes")(grad_ckpt) == pytest.approx(value, rel=0.02), name


def test_meta_live_bytes_count_meta_storages():
    torch = _torch()
    from zeroest.validate.memtrack import LiveBytes

    meter = LiveBytes(device="meta")
    with meter:
        x = torch.empty(64, 32, device="meta", dtype=torch.bfloat16)
        y = x @ x.t()
    assert meter.live_bytes == x.nbytes + y.nbytes == 64 * 32 * 2 + 64 * 64 * 2


# -- scaling, modes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "attn"), [("llama", "eager"), ("gpt2", "sdpa"), ("phi3", "sdpa")])
def test_scaled_profile_equals_a_second_trace(family, attn):
    """The polynomials fitted at (2, 64), (4, 64), (2, 128) give the profile at (3, 40) that a direct trace at
    (3, 40) measures (eager's s^2 terms included); labels padded to s + 1 are fitted as s: a few bytes."""
    torch = _torch()
    config, b, s = TINY[family], 3, 40
    entry = tracer.trace_polys(config, "bf16", attn)
    fitted = polys.profile_from_polys(entry, b, s)
    model = build_model(config, "bf16", attn)
    direct = {"layout": entry["layout"]}
    for mode, ckpt in (("plain", False), ("ckpt", True)):
        trace = recorder.run_trace(model, torch.zeros((b, s), dtype=torch.long, device="meta"), grad_ckpt=ckpt)
        direct[mode] = polys.analyze(trace, [{(0, 0): n} for n in trace.sizes])
    direct_profile = polys.profile_from_polys(direct, b, s)
    for field in dataclasses.fields(fitted):
        want = getattr(direct_profile, field.name)
        assert getattr(fitted, field.name) == pytest.approx(want, abs=8 * b), field.name


def test_auto_traces_and_falls_back_with_a_warning(monkeypatch, caplog):
    _torch()
    shape = _shape("llama", TINY["llama"])
    profile, source = activation_profile(shape, 2, 16, config=TINY["llama"])
    assert source == "traced"
    assert profile == tracer.traced_profile(shape, 2, 16, config=TINY["llama"])

    def broken(*args, **kwargs):
        raise RuntimeError("no meta kernel for this op")

    monkeypatch.setattr(tracer, "traced_profile", broken)
    with caplog.at_level(logging.WARNING):
        profile, source = activation_profile(shape, 2, 16, config=TINY["llama"])
    assert source.startswith("closed-form (trace failed: RuntimeError")
    assert profile == closed_form_profile(shape, 2, 16, config=TINY["llama"])
    assert len([r for r in caplog.records if "could not trace" in r.message]) == 1


# -- closed form against the tracer on the presets
# ---------------------------------------------------------------
_PROPERTIES = ("forward_end_bytes", "forward_peak_bytes", "backward_peak_bytes")


def _agree(name: str, config: dict, b: int, s: int, dtype: str, attn: str) -> None:
    _torch()
    shape = _shape(name, config)
    traced = tracer.traced_profile(shape, b, s, dtype, attn, config=config)
    closed = closed_form_profile(shape, b, s, dtype, attn, config)
    assert closed.layer_saved_bytes == pytest.approx(traced.layer_saved_bytes, rel=0.05)
    for prop in _PROPERTIES:
        for ckpt in (False, True):
            want = getattr(traced, prop)(ckpt)
            assert getattr(closed, prop)(ckpt) == pytest.approx(want, rel=0.05), (prop, ckpt, b, s)


@pytest.mark.parametrize("path", lane(PRESETS, 3, ids=[os.path.basename(p)[:-5] for p in PRESETS]))
def test_closed_form_within_5_percent_of_traced_for_presets(path):
    config = json.load(open(path))
    for b, s in ((1, 512), (4, 2048), (2, 8192)):
        _agree(os.path.basename(path)[:-5], config, b, s, "bf16", "sdpa")


@pytest.mark.parametrize("name", lane(["gpt2", "llama-3-8b", "pythia-1b", "phi-3-mini", "gemma-2b", "opt-125m"], 1,
                                      ids=["gpt2", "llama-3-8b", "pythia-1b", "phi-3-mini", "gemma-2b", "opt-125m"]))
@pytest.mark.parametrize(("dtype", "attn"), [("bf16", "eager"), ("bf16", "flash"), ("fp32", "sdpa")])
def test_closed_form_within_5_percent_for_other_kernels(name, dtype, attn):
    path = os.path.join(os.path.dirname(__file__), "..", "data", "models", f"{name}.json")
    if not os.path.exists(path):
        pytest.skip(f"no preset {name}")
    for b, s in ((1, 1024), (4, 4096)):
        _agree(name, json.load(open(path)), b, s, dtype, attn)


@pytest.mark.parametrize("path", PRESETS, ids=[os.path.basename(p)[:-5] for p in PRESETS])
def test_hf_config_rebuilds_what_activations_need(path):
    """A ModelShape without its config.json (``hf_config`` rebuilds it from fields and family defaults) gives
    the closed form of the verbatim config, below phi-3's 2047-token sliding window (not in ModelShape)."""
    config = json.load(open(path))
    shape = _shape(os.path.basename(path)[:-5], config)
    assert closed_form_profile(shape, 2, 1024) == closed_form_profile(shape, 2, 1024, config=config)

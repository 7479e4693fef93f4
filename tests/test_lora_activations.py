"""Activations of LoRA (peft) and frozen-weight training: torch's saving rule, the traced profile against real
CPU runs of a tiny peft-wrapped llama, the cache, the closed form against named terms and the tracer.

Real runs build the model as the validator does (``trace.model.build_trained``: checkpointing on the HF model,
then ``peft.get_peft_model`` with ``LoraConfig(r, lora_alpha, lora_dropout, target_modules, modules_to_save,
task_type="CAUSAL_LM")``, adapters in the run's dtype as DeepSpeed casts them), on the CPU with real tensors.
"""

from __future__ import annotations

import json
import os

import pytest
from test_activations import TINY, B, S, _measure, _torch, saved_bytes_of_forward
from zeroest.estimator.core.activations import activation_profile
from zeroest.estimator.core.adapters import Adapters, frozen_base_names
from zeroest.estimator.core.architecture import shape_from_config
from zeroest.estimator.core.closed_form import closed_form_profile
from zeroest.estimator.trace import polys, tracer

LLAMA = TINY["llama"]
MODELS = os.path.join(os.path.dirname(__file__), "..", "data", "models")


def _traced(shape, b: int, s: int, adapters: Adapters | None = None, **kwargs):
    """``tracer.traced_profile`` with the frozen names ``activation_profile`` passes."""
    frozen = frozen_base_names(shape, adapters) if adapters is not None and not adapters.full else None
    return tracer.traced_profile(shape, b, s, adapters=adapters, frozen=frozen, **kwargs)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Every test traces into its own cache directory."""
    monkeypatch.setenv("ZEROEST_CACHE_DIR", str(tmp_path / "profiles"))
    monkeypatch.setattr(tracer, "_MEMO", {})


def _peft():
    torch = _torch()
    pytest.importorskip("peft")
    return torch


# -- torch's rule
# -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [False, True])
def test_a_frozen_linear_saves_no_input(bias):
    """autograd's generated ``mm``/``addmm`` save ``self`` (the input) only when the weight's gradient is
    wanted (``should_compute_output``): trainable, the input's bytes and the weight; frozen, the weight only."""
    torch = _torch()
    x = torch.randn(B, S, 64, dtype=torch.bfloat16, requires_grad=True)
    saved = {}
    for trains in (True, False):
        linear = torch.nn.Linear(64, 32, bias=bias, dtype=torch.bfloat16).requires_grad_(trains)
        weight = linear.weight.untyped_storage().data_ptr()
        got = []

        def pack(tensor, got=got):
            got.append(tensor.untyped_storage())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            linear(x)
        saved[trains] = sum(s.nbytes() for s in got if s.data_ptr() != weight)
    assert saved == {True: x.nbytes, False: 0}


# -- the tracer against real CPU runs
# -----------------------------------------------------------------------------
def _real(adapters: Adapters, grad_ckpt: bool, config: dict = LLAMA):
    """The 3-layer model of ``config`` trained with ``adapters`` on the CPU, and its input ids."""
    torch = _peft()
    from zeroest.estimator.trace.model import build_trained

    torch.manual_seed(0)
    frozen = frozen_base_names(shape_from_config(config, "tiny"), adapters)
    model = build_trained(config, "bf16", "sdpa", adapters, grad_ckpt=grad_ckpt, frozen=frozen, device="cpu",
                          num_layers=None)
    return model, torch.randint(0, config["vocab_size"], (B, S))


def _real_saved_bytes(adapters: Adapters) -> int:
    """Bytes of the distinct storages autograd saves in a real CPU forward, weights and buffers left out."""
    _peft()
    return saved_bytes_of_forward(*_real(adapters, grad_ckpt=False))


LORA = [Adapters(lora_rank=8), Adapters(lora_rank=64), Adapters(lora_rank=8, lora_dropout=0.1),
        Adapters(lora_rank=64, lora_dropout=0.1, lora_targets="q_proj,v_proj,down_proj")]
LORA_IDS = ["r8", "r64", "r8-dropout", "r64-dropout-qvd"]


@pytest.mark.parametrize("adapters", [pytest.param(a, id=i, marks=() if i == "r8" else (pytest.mark.slow,))
                                      for a, i in zip(LORA, LORA_IDS, strict=True)])
def test_traced_lora_saved_bytes_equal_what_autograd_saves_on_cpu(adapters):
    """The meta trace (CPU kernels) of the 2-layer peft copy, extrapolated to 3 layers, counts exactly the
    bytes a real CPU run of the peft-wrapped model saves: lora_A's input (or its dropped copy and the dropout
    noise), lora_B's r-wide input, and none of the frozen Linears' inputs."""
    _peft()
    entry = tracer.trace_polys(LLAMA, "bf16", "sdpa", target="cpu", adapters=adapters)
    at = {name: polys.evaluate(poly, B, S) for name, poly in entry["plain"]["regions"].items()}
    traced = at["embed"] + at["layer0"] + 2 * at["layer1"] + at["head"] + at["loss"]
    assert traced == _real_saved_bytes(adapters)


@pytest.mark.slow
def test_lora_layer_is_the_full_layer_less_frozen_saves_plus_adapters():
    """Per layer (CPU trace, T = b*s tokens, p = 2): LoRA on all 7 Linears of llama saves the full layer's
    bytes less the two RMSNorm casts (frozen norm weights, 2 p*T*h) plus lora_B's inputs (7 p*T*r); with
    dropout the norms' outputs and the MLP product (read by frozen Linears only) go, and each wrapped Linear
    keeps its dropped copy and the CPU dropout noise, 2 p*T*n (n: the Linear's input width)."""
    _peft()
    h, i, qd, p, t = 64, 160, 64, 2, B * S

    def layer(adapters=None):
        entry = tracer.trace_polys(LLAMA, "bf16", "sdpa", target="cpu", adapters=adapters)
        return polys.evaluate(entry["plain"]["regions"]["layer1"], B, S)

    full = layer()
    assert layer(Adapters(lora_rank=8)) == full - 2 * p * t * h + 7 * p * t * 8
    inputs = 5 * h + qd + i  # q, k, v, gate, up read h; o reads a*d; down reads i
    assert layer(Adapters(lora_rank=8, lora_dropout=0.1)) == (
        full - 2 * p * t * h + 7 * p * t * 8 - 2 * p * t * h - p * t * i + 2 * p * t * inputs)


CASES = [(Adapters(lora_rank=8), "r8"), (Adapters(lora_rank=64, lora_dropout=0.1), "r64-dropout"),
         (Adapters(freeze="layers:2"), "freeze-layers-2")]


@pytest.mark.slow
@pytest.mark.parametrize("grad_ckpt", [False, True], ids=["plain", "ckpt"])
@pytest.mark.parametrize("adapters", [pytest.param(a, id=i) for a, i in CASES])
def test_traced_lora_profile_matches_live_bytes_of_a_real_cpu_step(adapters, grad_ckpt):
    """forward_end, forward_peak and backward_peak of the traced profile against LiveBytes on a real 3-layer
    CPU step of the peft-wrapped (or partly frozen) model, parameter gradients excluded: within 0.1%."""
    _peft()
    profile = _traced(shape_from_config(LLAMA, "tiny"), B, S, target="cpu", adapters=adapters)
    measured = _measure(LLAMA, "sdpa", grad_ckpt, _real(adapters, grad_ckpt))
    for name, value in measured.items():
        assert getattr(profile, f"{name}_bytes")(grad_ckpt) == pytest.approx(value, rel=0.001), name


@pytest.mark.slow
def test_a_frozen_bottom_is_traced_as_it_trains():
    """Frozen embeddings and layer 0: layer 1, the first that trains, has no gradient coming in, layer 2 has one.
    The kinds (``trace.kinds``) keep them apart (layer 1 is the first of its kind, traced as itself), so the
    profile's live bytes equal the real step's (the measurement of the 0.1% test above)."""
    _peft()
    adapters = Adapters(freeze="embeddings,layers:1")
    profile = _traced(shape_from_config(LLAMA, "tiny"), B, S, target="cpu", adapters=adapters)
    measured = _measure(LLAMA, "sdpa", False, _real(adapters, False))
    for name, value in measured.items():
        assert getattr(profile, f"{name}_bytes")(False) == pytest.approx(value, rel=0.001), name


# -- the cache
# ----------------------------------------------------------------------------------------------------
def test_lora_and_full_profiles_never_share_a_cache_entry(tmp_path):
    """The key holds the adapters: a full and a LoRA profile are two files, and each reads back as itself."""
    _peft()
    shape = shape_from_config(LLAMA, "tiny")
    profiles = [_traced(shape, B, S, config=LLAMA, adapters=a) for a in (None, Adapters(lora_rank=8))]
    assert profiles[0].layer_saved_bytes != profiles[1].layer_saved_bytes
    assert len(os.listdir(tmp_path / "profiles")) == 2
    tracer._MEMO.clear()
    again = [_traced(shape, B, S, config=LLAMA, adapters=a) for a in (None, Adapters(lora_rank=8))]
    assert again == profiles
    assert _traced(shape, B, S, config=LLAMA, adapters=Adapters()) == profiles[0]


# -- the closed form
# ----------------------------------------------------------------------------------------------
def test_closed_form_lora_layer_from_named_terms():
    """llama-3-8b, all-linear, r = 16, no dropout: the full layer less the two RMSNorm casts (2 p*T*h) plus
    lora_B's inputs on the 7 Linears (7 p*T*r); the embedding keeps no input ids (8T, counted with the head)
    and, in a plain run, nothing of layer 0's input norm (fp32 input 4T*h and rstd 4T)."""
    config = json.load(open(os.path.join(MODELS, "llama-3-8b.json")))
    shape, b, s, p, h, r = shape_from_config(config, "llama-3-8b"), 2, 4096, 2, 4096, 16
    t = b * s
    full = closed_form_profile(shape, b, s, "bf16", "sdpa", config)
    lora = closed_form_profile(shape, b, s, "bf16", "sdpa", config, adapters=Adapters(lora_rank=r))
    assert lora.layer_saved_bytes == full.layer_saved_bytes - 2 * p * t * h + 7 * p * t * r
    assert lora.all_layers_saved_bytes == 32 * lora.layer_saved_bytes
    assert lora.embedding_saved_bytes == full.embedding_saved_bytes - 8 * t - (4 * t * h + 4 * t)
    assert lora.ckpt_embedding_saved_bytes == full.ckpt_embedding_saved_bytes - 8 * t
    assert lora.head_saved_bytes == full.head_saved_bytes + 8 * t - 2 * p * t * h
    assert closed_form_profile(shape, b, s, "bf16", "sdpa", config, adapters=Adapters(freeze="layers:4")) == full


_PROPERTIES = ("forward_end_bytes", "forward_peak_bytes", "backward_peak_bytes")
_TARGETS = {"gpt2": "all-linear", "pythia-1b": "all-linear", "phi-3-mini": "all-linear",
            "opt-125m": "q_proj,k_proj,v_proj,out_proj"}


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=(pytest.mark.slow,) if n != "llama-3-8b" else ())
    for n in ("llama-3-8b", "qwen2.5-0.5b", "gemma-2b", "mistral-7b", "gpt2", "pythia-1b", "opt-125m",
              "phi-3-mini")])
@pytest.mark.parametrize("fp32", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["bf16", "fp32"])
@pytest.mark.parametrize("adapters", [Adapters(lora_rank=8), pytest.param(
    Adapters(lora_rank=64, lora_dropout=0.1), marks=pytest.mark.slow)], ids=["r8", "r64-dropout"])
def test_closed_form_lora_within_5_percent_of_traced(name, adapters, fp32):
    """The closed form against the traced profile (meta, CUDA kernels), both checkpointing modes, adapters in
    bf16 or peft's fp32: the saved layer and the phases' live bytes within 5%, as the full fine-tune's closed
    form; llama-like families with q/k/v/o/gate/up/down names too."""
    _peft()
    config = json.load(open(os.path.join(MODELS, f"{name}.json")))
    shape = shape_from_config(config, name)
    targets = [_TARGETS.get(name, "all-linear")] + (["q_proj,v_proj", "gate_proj,up_proj,down_proj"]
                                                     if name not in _TARGETS else [])
    for target in targets:
        lora = Adapters(lora_rank=adapters.lora_rank, lora_dropout=adapters.lora_dropout, lora_targets=target)
        for b, s in ((1, 512), (4, 2048)):
            traced = _traced(shape, b, s, config=config, adapters=lora, adapters_fp32=fp32)
            closed = closed_form_profile(shape, b, s, "bf16", "sdpa", config, adapters=lora, adapters_fp32=fp32)
            assert closed.layer_saved_bytes == pytest.approx(traced.layer_saved_bytes, rel=0.05)
            for prop in _PROPERTIES:
                for ckpt in (False, True):
                    want = getattr(traced, prop)(ckpt)
                    assert getattr(closed, prop)(ckpt) == pytest.approx(want, rel=0.05), (target, prop, ckpt)


def test_activation_profile_passes_the_adapters():
    shape = shape_from_config(LLAMA, "tiny")
    lora = Adapters(lora_rank=8)
    profile, source = activation_profile(shape, B, S, config=LLAMA, mode="closed-form", adapters=lora)
    assert source == "closed-form"
    assert profile == closed_form_profile(shape, B, S, config=LLAMA, adapters=lora)
    assert profile != activation_profile(shape, B, S, config=LLAMA, mode="closed-form")[0]


# -- the adapters' dtype
# ------------------------------------------------------------------------------------------
_DS_DTYPES = """
import json, logging, warnings
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
import torch
from zeroest.validate.fakepg import init_fake_world
init_fake_world(0, 2)
import deepspeed, peft
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig
ds = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}, "zero_optimization": {"stage": 3},
      "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}}
out = {}
for zero_init in (True, False):
    keep = HfDeepSpeedConfig(ds) if zero_init else None
    cfg = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=300)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    engine, *_ = deepspeed.initialize(model=model, config=ds,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    out[str(zero_init)] = sorted({str(p.dtype) for n, p in engine.module.named_parameters() if "lora_" in n})
    del keep
print("DTYPES", json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.deepspeed
def test_deepspeed_keeps_peft_fp32_adapters_only_under_zero_init():
    """peft upcasts bf16 adapters to fp32; DeepSpeed's engine casts them back to bf16, except in a model built
    under zero.Init (stage 3, rank 0 of 2 on the fake process group): the case ``adapters_fp32`` models."""
    import subprocess
    import sys

    _peft()
    pytest.importorskip("deepspeed")
    done = subprocess.run([sys.executable, "-c", _DS_DTYPES], capture_output=True, text=True, timeout=300)
    line = next(x for x in done.stdout.splitlines() if x.startswith("DTYPES"))
    assert json.loads(line.split(" ", 1)[1]) == {"True": ["torch.float32"], "False": ["torch.bfloat16"]}


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_traced_fp32_adapters_saved_bytes_equal_a_real_cpu_run(dropout):
    """fp32 adapters in a bf16 model: every wrapped Linear saves its own fp32 cast of x (or the cast's dropped
    copy and the noise) and lora_B an fp32 r-wide input, none of the bf16 x; trace and real run agree exactly,
    and the layer is the bf16-adapter layer's plus the named difference."""
    torch = _peft()
    from zeroest.estimator.trace.model import build_trained

    adapters = Adapters(lora_rank=8, lora_dropout=dropout)
    entry = tracer.trace_polys(LLAMA, "bf16", "sdpa", target="cpu", adapters=adapters, adapters_fp32=True)
    at = {name: polys.evaluate(poly, B, S) for name, poly in entry["plain"]["regions"].items()}
    torch.manual_seed(0)
    model = build_trained(LLAMA, "bf16", "sdpa", adapters, grad_ckpt=False, device="cpu", num_layers=None,
                          adapters_fp32=True)
    ids = torch.randint(0, LLAMA["vocab_size"], (B, S))
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids, use_cache=False)
    assert at["embed"] + at["layer0"] + 2 * at["layer1"] + at["head"] + at["loss"] == sum(saved.values())
    half = polys.evaluate(tracer.trace_polys(LLAMA, "bf16", "sdpa", target="cpu", adapters=adapters)
                          ["plain"]["regions"]["layer1"], B, S)
    t, p, h, i, r, inputs = B * S, 2, 64, 160, 8, 5 * 64 + 64 + 160
    if dropout:  # CPU dropout: noise and dropped copy in the input's dtype, fp32 instead of bf16
        assert at["layer1"] == half + 2 * (4 - p) * t * inputs + 7 * (4 - p) * t * r
    else:  # the norms' outputs and the MLP product are no longer lora_A's inputs
        assert at["layer1"] == half - 2 * p * t * h - p * t * i + 4 * t * inputs + 7 * (4 - p) * t * r


@pytest.mark.parametrize("zero_init", [False, True])
def test_estimate_uses_the_lora_profile(zero_init):
    """``estimate()`` passes the setup's adapters: the activations of a LoRA job are the LoRA profile's, with
    fp32 adapters only for a stage-3 model built under zero.Init, and the assumptions say which."""
    from dataclasses import replace

    from zeroest.estimator.core.estimate import estimate, model_states
    from zeroest.estimator.core.setup import Parallelism, TrainingSetup, Workload, ZeroConfig
    from zeroest.estimator.core.timeline import timeline

    config = json.load(open(os.path.join(MODELS, "llama-3-8b.json")))
    shape = shape_from_config(config, "llama-3-8b")
    full = TrainingSetup(model=shape, parallel=Parallelism(gpus_per_node=8),
                         zero=ZeroConfig(stage=3, zero_init=zero_init),
                         workload=Workload(micro_batch=1, seq_len=2048, activations="closed-form"))
    lora = replace(full, adapters=Adapters(lora_rank=16))
    profile = closed_form_profile(shape, 1, 2048, "bf16", "sdpa", config, adapters=lora.adapters,
                                  adapters_fp32=zero_init, zero3_linear=True)  # stage 3's linear
    states = model_states(lora, "cuda")
    want = max(p.components["activations"] for p in timeline(lora, states, profile))
    got = estimate(lora)
    assert max(p.components["activations"] for p in got.phases) == want
    assert want != max(p.components["activations"] for p in estimate(full).phases)
    note = next(n for n in got.assumptions if n.startswith("activations of LoRA"))
    assert ("fp32" in note) == zero_init


def test_wrapping_with_peft_prints_no_transformers_deprecation(recwarn):
    """peft 0.21 reads ``is_gradient_checkpointing``, which transformers 5.2x deprecates with a FutureWarning on
    every wrap: ``trace.model.peft_model`` drops that one warning (it reached predict's output once per trace) and
    lets any other through."""
    import warnings

    from zeroest.estimator.trace.model import build_trained, peft_model

    def wrap(model, config):
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                      stacklevel=2)
        warnings.warn("another library's FutureWarning", FutureWarning, stacklevel=2)
        return (model, config)

    assert peft_model(wrap, "model", "config") == ("model", "config")
    assert [str(w.message) for w in recwarn] == ["another library's FutureWarning"]
    recwarn.clear()
    adapters = Adapters(lora_rank=4, lora_alpha=8, lora_targets="all-linear")
    build_trained(LLAMA, "bf16", "sdpa", adapters, grad_ckpt=True)
    assert not [w for w in recwarn if "is_gradient_checkpointing" in str(w.message)]

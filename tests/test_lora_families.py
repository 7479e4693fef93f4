"""LoRA on qwen3, qwen3_moe, mixtral and the families read off the meta model (olmo2, granite, ...).

Expectations come from peft 0.21 itself (``get_peft_model`` on the model built on the meta device, and its MoE
target conversion table), from real CPU forwards of the peft-wrapped model (what autograd saves), and from the
traced profile (estimator/trace/) for the closed form.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_lora_activations import _cache, _peft, _real_saved_bytes  # noqa: F401 (_cache: autouse fixture)
from test_qwen3_mixtral import CONFIGS
from typer.testing import CliRunner
from zeroest.estimator.catalog.models import load_model
from zeroest.estimator.core.adapters import PEFT_MOE_CONVERTED, Adapters, frozen_base_names, trainable_split
from zeroest.estimator.core.architecture import param_tensors, shape_from_config
from zeroest.estimator.core.closed_form import closed_form_profile
from zeroest.estimator.core.estimate import estimate
from zeroest.estimator.trace import polys, tracer

from zeroest.api import build_setup
from zeroest.cli import app

GPU_MODELS = Path(__file__).resolve().parent.parent / "data" / "runs" / "h200-families" / "models"
_TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300, max_position_embeddings=256)
GENERIC = {"olmo2": dict(model_type="olmo2", **_TINY), "granite": dict(model_type="granite", **_TINY)}
"""Dense families without a closed form, read off the meta model."""
QKVO = "q_proj,k_proj,v_proj,o_proj"
MLA = "q_a_proj,q_b_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj"
"""deepseek_v3's attention Linears (multi-head latent attention)."""


def _config(name: str) -> dict:
    return json.loads((GPU_MODELS / f"{name}.json").read_text())


@pytest.mark.parametrize("name", ["qwen3", "qwen3-tied-bias", "mixtral", "qwen3_moe", "qwen3_moe-mixed",
                                  *GENERIC])
def test_linear_shapes_are_the_real_modules(name):
    """Every ``nn.Linear`` weight carries the module's (out, in) and nothing else carries one (the routers and
    the fused 3-D experts are no Linear); names and numels stay those of ``named_parameters()``."""
    pytest.importorskip("transformers")
    import torch
    from zeroest.estimator.trace.generic import meta_model

    config = {**CONFIGS, **GENERIC}[name]
    model = meta_model(config)
    linears = {f"{n}.weight": (m.out_features, m.in_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)}
    tensors = param_tensors(shape_from_config(config, name))
    assert [(t.name, t.numel) for t in tensors] == [(n, p.numel()) for n, p in model.named_parameters()]
    assert {t.name: t.linear_shape for t in tensors if t.linear_shape} == {
        n: s for n, s in linears.items() if n in {t.name for t in tensors}}


@pytest.mark.parametrize(("name", "targets"), [
    ("qwen3-small", "all-linear"), ("olmo2-small", "all-linear"), ("granite-small", "all-linear"),
    ("qwen3-small", "q_proj,v_proj"), ("mixtral-small", QKVO), ("qwen3-moe-small", QKVO),
    ("deepseek-v3-small", MLA),
])
def test_trainable_counts_equal_peft_on_meta(name, targets):
    """r = 16: the trainable and total elements equal those of ``get_peft_model`` on the full-depth meta model
    (peft's ``print_trainable_parameters`` figures)."""
    peft = _peft() and pytest.importorskip("peft")
    from zeroest.estimator.trace.model import build_model

    config = _config(name)
    hf = build_model(config, "bf16", "sdpa", num_layers=None)
    lora = peft.LoraConfig(r=16, target_modules=targets if targets == "all-linear" else targets.split(","),
                           task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, lora)
    trainable, total = pm.get_nb_trainable_parameters()
    split = trainable_split(load_model(str(GPU_MODELS / f"{name}.json")),
                            Adapters(lora_rank=16, lora_targets=targets))
    assert (split.trainable_numel, split.total_numel) == (trainable, total)


def test_qwen3_small_all_linear_from_named_terms():
    """qwen3-small (h 1024, 16 heads of 128, 8 kv heads, i 3072, 16 layers), r = 16: per layer q (1024 -> 2048),
    k and v (1024 -> 1024), o (2048 -> 1024), gate and up (1024 -> 3072), down (3072 -> 1024), each r(in + out)."""
    r, h, qd, kvd, i = 16, 1024, 2048, 1024, 3072
    layer = r * ((h + qd) + 2 * (h + kvd) + (qd + h) + 2 * (h + i) + (i + h))
    split = trainable_split(load_model(str(GPU_MODELS / "qwen3-small.json")), Adapters(lora_rank=r))
    assert split.trainable_numel == 16 * layer == 5_767_168


@pytest.mark.parametrize(("name", "targets", "hit", "use"), [
    ("mixtral-small", "all-linear", "gate, w1, w2, w3", QKVO), ("qwen3-moe-small", "all-linear", "down_proj, gate",
                                                                QKVO),
    ("mixtral-small", "q_proj,w2", "w2", QKVO), ("qwen3-moe-small", "up_proj", "up_proj", QKVO),
    ("deepseek-v3-small", "all-linear", "gate_proj, up_proj", MLA),
])
def test_lora_on_routed_experts_is_one_clear_line(name, targets, hit, use):
    """peft 0.21 rewrites these targets into LoRA on the router and the fused experts (lora.ParamWrapper): the
    CLI refuses in one line naming what is wrapped and the model's attention Linears as the working
    alternative, exit 2."""
    result = CliRunner().invoke(app, ["predict", "--model", str(GPU_MODELS / f"{name}.json"), "--gpus", "2",
                                      "--lora-rank", "16", "--lora-targets", targets])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("zeroest: error:"), result.output
    assert hit in lines[0] and lines[0].endswith(f"--lora-targets {use}")


def test_the_moe_table_is_peft_s():
    """``PEFT_MOE_CONVERTED`` holds the model types peft 0.21 converts (transformers' conversion pattern mapped to
    one of peft's ``_MOE_TARGET_MODULE_MAPPING`` entries) with that entry's v4 module names."""
    pytest.importorskip("peft")
    from peft.utils import transformers_weight_conversion as conv

    want = {family: tuple(sorted(conv._MOE_TARGET_MODULE_MAPPING[base]))
            for family, base in conv._MODEL_TO_CONVERSION_PATTERN.items()
            if base in conv._MOE_TARGET_MODULE_MAPPING and base in conv._MOE_FUSED_TARGETS
            and conv.get_checkpoint_conversion_mapping(family) is not None and family.islower()}
    assert {f: tuple(sorted(n)) for f, n in PEFT_MOE_CONVERTED.items()} == want


_CPU_CASES = [("qwen3", Adapters(lora_rank=8)), ("olmo2", Adapters(lora_rank=8)),
              ("qwen3_moe", Adapters(lora_rank=8, lora_targets=QKVO)),
              ("granite", Adapters(lora_rank=8, lora_dropout=0.1)),
              ("mixtral", Adapters(lora_rank=8, lora_dropout=0.1, lora_targets=QKVO))]


@pytest.mark.parametrize(("name", "adapters"), [pytest.param(n, a, id=n, marks=() if i < 2 else pytest.mark.slow)
                                                for i, (n, a) in enumerate(_CPU_CASES)])
def test_traced_lora_saved_bytes_equal_a_real_cpu_forward(name, adapters):
    """The meta trace of the 2-layer peft copy, extrapolated to 3 layers, counts exactly the bytes autograd saves
    in a real CPU forward of the 3-layer peft-wrapped model (bf16, B = 2, S = 16)."""
    _peft()
    from test_activations import B, S, saved_bytes_of_forward
    from test_lora_activations import _real

    config = {**CONFIGS, **GENERIC}[name]
    entry = tracer.trace_polys(config, "bf16", "sdpa", target="cpu", adapters=adapters)
    at = {region: polys.evaluate(poly, B, S) for region, poly in entry["plain"]["regions"].items()}
    traced = at["embed"] + at["layer0"] + 2 * at["layer1"] + at["head"] + at["loss"]
    assert traced == saved_bytes_of_forward(*_real(adapters, False, config))


_CLOSED = [("qwen3-small", Adapters(lora_rank=16)), ("qwen3-small", Adapters(lora_rank=16, lora_dropout=0.1)),
           ("mixtral-small", Adapters(lora_rank=16, lora_targets=QKVO)),
           ("qwen3-moe-small", Adapters(lora_rank=16, lora_targets="q_proj,v_proj", lora_dropout=0.1))]


@pytest.mark.slow
@pytest.mark.parametrize("zero3", [False, True], ids=["torch-linear", "zero3-linear"])
@pytest.mark.parametrize("fp32", [False, True], ids=["bf16", "fp32"])
@pytest.mark.parametrize(("name", "adapters"), _CLOSED)
def test_closed_form_lora_equals_the_trace(name, adapters, fp32, zero3):
    """The core install's LoRA closed form against the traced profile (meta, CUDA kernels): equal saved bytes
    per layer (qwen3's frozen q/k norms keep no cast; frozen experts and router keep no input), both
    checkpointing modes, with torch's or stage 3's linear (``zero3_linear``: frozen Linears keep their inputs,
    the experts' grouped_mm still not): qwen3's phase peaks within 0.01% (the llama-fitted transients, a few
    bytes a token off), the MoE families' (transients bounded above at the widest wrapped Linear) and those
    under stage 3's linear no lower and within 0.5%."""
    _peft()
    config = _config(name)
    shape = shape_from_config(config, name)
    for b, s in ((1, 1024), (4, 2048)):
        traced = tracer.traced_profile(shape, b, s, "bf16", "sdpa", config=config, adapters=adapters,
                                       frozen=frozen_base_names(shape, adapters), adapters_fp32=fp32,
                                       zero3_linear=zero3)
        closed = closed_form_profile(shape, b, s, "bf16", "sdpa", config, adapters=adapters, adapters_fp32=fp32,
                                     zero3_linear=zero3)
        assert closed.layer_saved_bytes == traced.layer_saved_bytes
        for prop in ("forward_end_bytes", "forward_peak_bytes", "backward_peak_bytes"):
            for ckpt in (False, True):
                want, got = getattr(traced, prop)(ckpt), getattr(closed, prop)(ckpt)
                if shape.family == "qwen3" and not zero3:
                    assert got == pytest.approx(want, rel=1e-4), (prop, ckpt)
                else:
                    assert want * (1 - 1e-4) <= got <= want * 1.005, (prop, ckpt)


def test_qwen3_lora_layer_from_named_terms():
    """qwen3-small, all-linear r = 16, no dropout, bf16 (p = 2): the full layer less the two RMSNorm casts
    (2p*T*h) and the q/k norms' casts (p*T*(a*d + kv*d)), plus lora_B's inputs on the 7 Linears (7p*T*r)."""
    config = _config("qwen3-small")
    shape = shape_from_config(config, "qwen3-small")
    b, s, p, h, qd, kvd, r = 2, 1024, 2, 1024, 2048, 1024, 16
    t = b * s
    full = closed_form_profile(shape, b, s, "bf16", "sdpa", config)
    lora = closed_form_profile(shape, b, s, "bf16", "sdpa", config, adapters=Adapters(lora_rank=r))
    assert lora.layer_saved_bytes == full.layer_saved_bytes - 2 * p * t * h - p * t * (qd + kvd) + 7 * p * t * r


def test_mixtral_attention_lora_layer_from_named_terms():
    """mixtral-small (h 1024, q 1024, k 2 of 8 experts of width 2816), q/k/v/o r = 16: the full layer less the
    norms' casts (2p*T*h), the frozen router's input (p*T*h), the frozen experts' gathered input and down's input
    (p*T*k*(h + i_e)), plus lora_B's inputs (4p*T*r)."""
    config = _config("mixtral-small")
    shape = shape_from_config(config, "mixtral-small")
    b, s, p, h, k, ie, r = 1, 2048, 2, 1024, 2, 2816, 16
    t = b * s
    full = closed_form_profile(shape, b, s, "bf16", "sdpa", config)
    lora = closed_form_profile(shape, b, s, "bf16", "sdpa", config, adapters=Adapters(lora_rank=r, lora_targets=QKVO))
    assert lora.layer_saved_bytes == (full.layer_saved_bytes - 3 * p * t * h - p * t * k * (h + ie)
                                      + 4 * p * t * r)


_NO_TORCH = """
import json, sys
for name in ("torch", "transformers", "deepspeed", "peft", "accelerate"):
    sys.modules[name] = None  # the core install
from zeroest.api import build_setup
from zeroest.estimator.catalog.models import load_model
from zeroest.estimator.core.estimate import estimate
flags = {flags!r}
setup = build_setup(load_model({path!r}), flags)
result = estimate(setup)
print(json.dumps([result.peak_allocated_bytes, result.activation_source]))
"""


def test_core_install_predicts_qwen3_lora():
    """Without torch, LoRA on qwen3-small predicts from the closed form, the same figure as this interpreter's
    closed-form prediction."""
    path = str(GPU_MODELS / "qwen3-small.json")
    flags = {"stage": 2, "world_size": 2, "micro_batch": 1, "seq_len": 1024, "lora_rank": 16, "grad_ckpt": True}
    done = subprocess.run([sys.executable, "-c", _NO_TORCH.format(flags=flags, path=path)], capture_output=True,
                          text=True, timeout=120, check=True)
    here = estimate(build_setup(load_model(path), {**flags, "activations": "closed-form"}))
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [here.peak_allocated_bytes, "closed-form"]


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_meta_reading_agrees_with_the_written_families(family):
    """``trace.generic.meta_param_tensors`` on families that also have written tensors: gpt2's ``Conv1D``
    weights (stored (in, out)) read as (out, in), gpt_neox's ``embed_out`` as the output layer (``lm_head``,
    which peft's all-linear leaves out): names, components and Linear shapes equal the written ones."""
    pytest.importorskip("transformers")
    import dataclasses

    from test_activations import TINY
    from zeroest.estimator.trace.generic import meta_param_tensors

    config = TINY[family]
    shape = shape_from_config(config, family)
    meta = meta_param_tensors(dataclasses.replace(shape, extra={**shape.extra, "config": config}))
    assert meta == [(t.name, t.numel, t.component, t.linear_shape) for t in param_tensors(shape)]


@pytest.mark.slow
@pytest.mark.parametrize("grad_ckpt", [False, True], ids=["plain", "ckpt"])
@pytest.mark.parametrize("name", ["qwen3", "olmo2", "mixtral"])
def test_traced_lora_profile_matches_live_bytes_of_a_real_cpu_step(name, grad_ckpt):
    """forward_end, forward_peak and backward_peak of the traced profile (r = 8; mixtral on q/k/v/o) against
    LiveBytes on a real 3-layer CPU step of the peft-wrapped model, parameter gradients excluded: within 0.1%."""
    _peft()
    from test_activations import _measure
    from test_lora_activations import _real, _traced

    config = {**CONFIGS, **GENERIC}[name]
    adapters = Adapters(lora_rank=8, lora_targets=QKVO if name == "mixtral" else "all-linear")
    profile = _traced(shape_from_config(config, name), 2, 16, target="cpu", adapters=adapters, config=config)
    measured = _measure(config, "sdpa", grad_ckpt, _real(adapters, grad_ckpt, config))
    for prop, value in measured.items():
        assert getattr(profile, f"{prop}_bytes")(grad_ckpt) == pytest.approx(value, rel=0.001), prop

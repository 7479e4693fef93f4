"""Optimizer states on the tensors each ZeRO stage hands the optimizer (``core.optimizers``), and the optimizer
choices' rules, config reading and writing.

Expectations are derived from the named terms (bitsandbytes' 256-element blocks and 4096-element threshold,
Adafactor's row and column moments, Muon's split) and, where the optimizer is installed here, compared with the
state the real optimizer allocates on a flat fp32 tensor and on a small model.
"""

from __future__ import annotations

import pytest
from zeroest.estimator.configs.ds_write import ds_config
from zeroest.estimator.configs.read import setup_from_configs
from zeroest.estimator.core.architecture import param_tensors, shape_from_config
from zeroest.estimator.core.model_states import flat_group_numel
from zeroest.estimator.core.optimizers import (
    BNB_QMAP_BYTES,
    Seen,
    adafactor_bytes,
    bnb_8bit_bytes,
    muon_ns_temp_bytes,
    seen_tensors,
    state_bytes,
)
from zeroest.estimator.core.setup import Optimizer, Parallelism, TrainingSetup, ZeroConfig

LLAMA = dict(model_type="llama", vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
"""validate/dsprobe.py ``build_model("llama")``: 2 layers, h = 256, untied."""
H, V, FF, KV = 256, 1024, 688, 128  # hidden, vocabulary, MLP width, k/v projection width (2 kv heads x 64)
MATRICES = [(H, H), (KV, H), (KV, H), (H, H), (FF, H), (FF, H), (H, FF)]  # q k v o gate up down, per layer
VECTORS = 2 * H  # input and post-attention norms, per layer


def setup(name: str, stage: int = 0, world: int = 4, dtype: str = "bf16", **zero) -> TrainingSetup:
    return TrainingSetup(model=shape_from_config(LLAMA, "probe-llama"), parallel=Parallelism(gpus_per_node=world),
                         dtype=dtype, optimizer=Optimizer(name=name), zero=ZeroConfig(stage=stage, **zero))


def total_params() -> int:
    return 2 * V * H + 2 * (sum(m * k for m, k in MATRICES) + VECTORS) + H


def test_probe_shape_is_the_sum_of_its_terms():
    assert sum(t.numel for t in param_tensors(setup("adamw").model)) == total_params()


# ---- what each stage hands the optimizer -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adafactor", "adamw-8bit"])
def test_zero_hands_one_flat_partition(name):
    s = setup(name, stage=2)
    part = flat_group_numel(total_params(), 4) // 4
    assert seen_tensors(s, part) == (Seen(part),)


def test_stage3_hands_sub_groups():
    s = setup("adafactor", stage=3, sub_group_size=100_000)
    assert [t.numel for t in seen_tensors(s, 250_000)] == [100_000, 100_000, 50_000]


def test_stage0_bf16_unfused_keeps_shapes():
    seen = seen_tensors(setup("adafactor", stage=0), total_params())
    assert len(seen) == len(param_tensors(setup("adafactor").model))
    assert seen[0] == Seen(V * H, (V, H)), "the embedding is a (V, h) matrix"
    assert sum(1 for t in seen if t.matrix) == 2 + 2 * len(MATRICES)


# ---- Adafactor --------------------------------------------------------------------------------------------------


def test_adafactor_factored_only_at_stage0():
    factored = 4 * (2 * (V + H) + 2 * (sum(m + k for m, k in MATRICES) + VECTORS) + H)
    assert state_bytes(setup("adafactor", stage=0), total_params()) == factored
    part = flat_group_numel(total_params(), 4) // 4
    assert state_bytes(setup("adafactor", stage=2), part) == 4 * part, "a 1-D partition keeps its full variance"
    assert adafactor_bytes(Seen(64 * 32, (64, 32))) == 4 * (64 + 32)


def _state_bytes(optimizer) -> int:
    """Bytes of every tensor in the optimizer's state beyond one element (the step counters), storages once."""
    import torch

    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.numel() > 1 and value.untyped_storage().data_ptr() not in seen:
                seen.add(value.untyped_storage().data_ptr())
                total += value.numel() * value.element_size()
    return total


def _step(optimizer, params) -> None:
    import torch

    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()


@pytest.mark.parametrize("shape", [(10_000,), (64, 32), (3, 40, 16)])
def test_torch_adafactor_states_equal_formula(shape):
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = torch.optim.Adafactor([p])
    _step(opt, [p])
    matrix = (shape[-2], shape[-1]) if len(shape) >= 2 else None
    lead = 1 if len(shape) < 3 else shape[0]
    assert _state_bytes(opt) == lead * adafactor_bytes(Seen(p.numel() // lead, matrix))


@pytest.mark.slow
def test_transformers_adafactor_states_equal_formula():
    torch = pytest.importorskip("torch")
    optimization = pytest.importorskip("transformers.optimization")
    params = [torch.nn.Parameter(torch.zeros(10_000)), torch.nn.Parameter(torch.zeros(64, 32))]
    opt = optimization.Adafactor(params)  # beta1 None, relative step: no exp_avg
    _step(opt, params)
    assert _state_bytes(opt) == adafactor_bytes(Seen(10_000)) + adafactor_bytes(Seen(64 * 32, (64, 32)))


@pytest.mark.slow
def test_torch_adafactor_on_the_small_model_equals_stage0_fp32():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from zeroest.validate.dsprobe import build_model

    model = build_model("llama", "fp32")
    params = list(model.parameters())
    opt = torch.optim.Adafactor(params)
    _step(opt, params)
    s = setup("adafactor", stage=0, dtype="fp32")
    assert _state_bytes(opt) == state_bytes(s, total_params())


# ---- bitsandbytes 8-bit AdamW -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("numel", "expected"), [
    (10_000, 2 * 10_000 + 2 * 4 * 40),  # uint8 states + 40 blocks of 256 (39 full, one of 16) x two fp32 absmax
    (4_096, 2 * 4_096 + 2 * 4 * 16),  # exactly min_8bit_size: quantised
    (4_095, 2 * 4 * 4_095),  # below it: two fp32 states
])
def test_bnb_8bit_bytes(numel, expected):
    assert bnb_8bit_bytes(numel) == expected


def test_bnb_flat_partition_one_tensor():
    s = setup("adamw-8bit", stage=2)
    part = flat_group_numel(total_params(), 4) // 4
    assert state_bytes(s, part) == 2 * part + 8 * -(-part // 256) + BNB_QMAP_BYTES


@pytest.mark.slow  # imports bitsandbytes (~8 s the first time)
@pytest.mark.parametrize("numel", [10_000, 4_095])
def test_real_adamw8bit_on_a_flat_tensor(numel):
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    p = torch.nn.Parameter(torch.zeros(numel))
    opt = bnb.optim.AdamW8bit([p])
    _step(opt, [p])
    qmaps = BNB_QMAP_BYTES if numel >= 4096 else 0
    assert _state_bytes(opt) == bnb_8bit_bytes(numel) + qmaps


@pytest.mark.slow
def test_real_adamw8bit_on_the_small_model_equals_stage0_fp32():
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    pytest.importorskip("transformers")
    from zeroest.validate.dsprobe import build_model

    params = list(build_model("llama", "fp32").parameters())
    opt = bnb.optim.AdamW8bit(params)
    _step(opt, params)
    assert torch.is_tensor(next(iter(opt.state.values()))["state1"])
    assert _state_bytes(opt) == state_bytes(setup("adamw-8bit", stage=0, dtype="fp32"), total_params())


# ---- Lion, Muon ---------------------------------------------------------------------------------------------------


def test_lion_one_state():
    assert state_bytes(setup("lion", stage=3), 1000) == 4 * 1000


def test_muon_split_and_states():
    muon = 2 * sum(m * k for m, k in MATRICES)  # every q/k/v/o/MLP matrix; embeddings and lm_head get Adam
    adam = total_params() - muon
    assert state_bytes(setup("muon", stage=0), total_params()) == 4 * muon + 8 * adam
    world, b = 4, 2
    p3 = 2 * sum(-(-m * k // world) for m, k in MATRICES)
    a3 = 2 * -(-V * H // world) + (2 * 2 + 1) * -(-H // world)  # embed, lm_head; 2 norms x 2 layers + final
    assert state_bytes(setup("muon", stage=3), 0) == b * p3 + 8 * a3


@pytest.mark.slow
def test_muon_split_matches_deepspeed():
    pytest.importorskip("deepspeed")
    from types import SimpleNamespace

    import deepspeed
    from zeroest.validate.dsprobe import build_model

    model = build_model("llama", "bf16")
    deepspeed.set_optimizer_flags(SimpleNamespace(optimizer_name="muon", optimizer_params={}), model)
    tagged = sum(p.numel() for p in model.parameters() if p.use_muon)
    assert tagged == 2 * sum(m * k for m, k in MATRICES)


def test_muon_newton_schulz_temporaries():
    m, k = FF, H  # the largest Muon matrix: 688 x 256, r = 256
    assert muon_ns_temp_bytes(m, k, 2) == (2 + 2 + 2) * m * k + 4 * 2 * k * k


# ---- rules, ds_config ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "impl"), [("adamw-8bit", "bnb"), ("paged-adamw-8bit", "bnb"), ("lion", "fused"),
                                             ("muon", "fused"), ("adafactor", "torch")])
def test_default_impl(name, impl):
    assert setup(name).optimizer.impl == impl


@pytest.mark.parametrize(("name", "offload", "impl", "words"), [
    ("adamw-8bit", "cpu", None, "client optimizer"),
    ("muon", "cpu", None, "not modelled"),
    ("adafactor", "none", "fused", "FusedAdam/FusedLion"),
    ("lion", "none", "torch", "no Lion"),
    ("adamw", "none", "bnb", "bitsandbytes"),
])
def test_refused(name, offload, impl, words):
    with pytest.raises(ValueError, match=words):
        TrainingSetup(model=shape_from_config(LLAMA, "probe-llama"), optimizer=Optimizer(name=name, impl=impl),
                      zero=ZeroConfig(stage=2, offload_optimizer=offload))


def test_lion_offload_runs_cpu_lion():
    s = TrainingSetup(model=shape_from_config(LLAMA, "probe-llama"), optimizer=Optimizer(name="lion"),
                      zero=ZeroConfig(stage=2, offload_optimizer="cpu"))
    assert s.optimizer.impl == "cpu"


@pytest.mark.parametrize("name", ["adafactor", "adamw-8bit", "paged-adamw-8bit", "lion", "muon", "sgd-momentum"])
def test_written_config_reads_back(tmp_path, name):
    s = setup(name, stage=2)
    config = ds_config(s)
    assert ("optimizer" in config) is (name not in ("adamw-8bit", "paged-adamw-8bit"))
    path = tmp_path / "ds.json"
    import json

    path.write_text(json.dumps(config))
    read, _ = setup_from_configs(path, None, {"model": s.model, "gpus_per_node": 4, "optimizer": name})
    assert (read.optimizer.name, read.optimizer.impl) == (s.optimizer.name, s.optimizer.impl)


@pytest.mark.parametrize(("section", "words"), [
    ({"type": "adafactor"}, "exact name"),
    ({"type": "AdamW8bit"}, "bitsandbytes"),
    ({"type": "Adafactor"}, "zero_allow_untested_optimizer"),
])
def test_config_refusals(tmp_path, section, words):
    import json

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
                                "optimizer": section}))
    with pytest.raises(ValueError, match=words):
        setup_from_configs(path, None, {"model": shape_from_config(LLAMA, "probe-llama"), "gpus_per_node": 4})


@pytest.mark.slow  # imports bitsandbytes (~8 s the first time)
def test_client_optimizer():
    pytest.importorskip("bitsandbytes")
    torch = pytest.importorskip("torch")
    from zeroest.validate.client_optimizers import client_optimizer

    params = [torch.nn.Parameter(torch.zeros(8))]
    assert type(client_optimizer({"setup": {"optimizer": "paged-adamw-8bit"}}, params)).__name__ == "PagedAdamW8bit"
    assert client_optimizer({"setup": {"optimizer": "adamw"}}, params) is None


# ---- update temporaries, measured on the CPU ----------------------------------------------------------------------


def _step_temporaries(optimizer, params) -> int:
    """Peak bytes an optimizer step allocates beyond the parameters, gradients and states it starts with."""
    import torch
    from zeroest.validate.memtrack import LiveBytes

    tracker = LiveBytes(device="cpu")
    states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    tracker.adopt([*params, *(p.grad for p in params), *states])
    with tracker, tracker.phase("step") as phase:
        optimizer.step()
    return phase.peak_bytes - phase.start_bytes


@pytest.mark.parametrize("maker", ["torch", pytest.param("transformers", marks=pytest.mark.slow)])
def test_adafactor_temporaries_on_a_flat_partition(maker):
    """A ZeRO partition is one 1-D tensor: ``grad * grad`` and ``variance.clone()`` (torch), or ``grad**2 + eps``
    and ``rsqrt()`` (transformers) live at once: 8 bytes per element, ``optimizer_temp_bytes``."""
    torch = pytest.importorskip("torch")
    from zeroest.estimator.core.optimizers import optimizer_temp_bytes

    cls = torch.optim.Adafactor if maker == "torch" else pytest.importorskip("transformers.optimization").Adafactor
    numel = 100_000
    p = torch.nn.Parameter(torch.zeros(numel))
    opt = cls([p])
    _step(opt, [p])  # states exist, as from the second step on
    expected = optimizer_temp_bytes(setup("adafactor", stage=2), (numel,), "cuda")
    assert expected == 8 * numel
    assert _step_temporaries(opt, [p]) == pytest.approx(expected, abs=64)  # plus 0-d scalars (the step count)


def test_optimizers_grid_builds_what_deepspeed_takes():
    """Every row of data/grids/optimizers.yaml is a setup, and its ds_config names DeepSpeed's optimizer (none for
    the bitsandbytes client optimizers) with the flags DeepSpeed asks for."""
    from zeroest.estimator.configs.flat import setup_from_dict
    from zeroest.validate.grid import load_grid

    names = set()
    for entry in load_grid("optimizers").entries:
        s = setup_from_dict(dict(entry.setup))
        config = ds_config(s)
        names.add(s.optimizer.name)
        assert ("optimizer" in config) is (s.optimizer.impl != "bnb"), entry.where
        assert config.get("zero_allow_untested_optimizer", False) is (s.optimizer.name not in ("lion", "muon"))
        assert config["zero_optimization"].get("reduce_scatter", True) is not (s.optimizer.name == "muon"
                                                                                and s.stage == 3)
    assert names == {"adafactor", "lion", "muon", "sgd-momentum", "adamw-8bit", "paged-adamw-8bit"}


@pytest.mark.parametrize(("cls", "expected"), [
    ("FusedLion", ("lion", "fused")), ("DeepSpeedCPULion", ("lion", "cpu")), ("AdamW8bit", ("adamw-8bit", "bnb")),
    ("PagedAdamW8bit", ("paged-adamw-8bit", "bnb")), ("MuonWithAuxAdam", ("muon", "fused")),
])
def test_live_engine_optimizer_read(cls, expected):
    """``zeroest.watch`` reads the optimizer off the engine by the basic optimizer's class name."""
    from types import SimpleNamespace

    from zeroest.integrations.engine import optimizer_of

    optimizer = type(cls, (), {"param_groups": [{}], "aux_optimizer": None})()
    assert optimizer_of(SimpleNamespace(basic_optimizer=optimizer)) == expected



def test_adafactor_step_temporaries_at_stage0_and_on_flats():
    """_single_tensor_adafactor (torch/optim/_adafactor.py): a vector's step makes grad * grad and
    variance.clone() (8n); a matrix's only row_var @ col_var (4n), its moments taken by torch.norm along each axis
    (CUDA's reductions make no full-size copy). Stage 0 hands it the model's matrices: 4 x the largest (the
    embedding); ZeRO's 1-D flats: 8 x the partition."""
    from zeroest.estimator.core.optimizers import optimizer_temp_bytes

    s0 = setup("adafactor", stage=0, dtype="fp32")
    numels = tuple(t.numel for t in param_tensors(s0.model))
    largest_matrix = max(t.numel for t in param_tensors(s0.model) if t.linear_shape or t.component == "embeddings")
    largest_vector = max(t.numel for t in param_tensors(s0.model) if t.component == "norms")
    assert optimizer_temp_bytes(s0, numels, "cuda") == max(4 * largest_matrix, 8 * largest_vector)
    assert optimizer_temp_bytes(setup("adafactor", stage=2), (1000,), "cuda") == 8 * 1000


@pytest.mark.slow
def test_adafactor_stage0_row_on_the_gpu():
    """The H200 row: qwen2.5-1.5b, stage 0, N_d 1, torch Adafactor, checkpointing (data/runs/h200-optimizers):
    peak allocated within 0.5% (it was 4.5% over with 8n of the embedding)."""
    from importlib import resources

    from zeroest.report.join import join_rows
    from zeroest.report.load import load_runs

    loaded = load_runs([str(resources.files("zeroest.data") / "runs" / "h200-optimizers")])
    records, _ = join_rows(list(loaded.rows))
    (row,) = [r for r in records if r.setup.stage == 0 and r.setup.optimizer.name == "adafactor"]
    assert row.current.quantities["peak_allocated"] == pytest.approx(row.measured["peak_allocated"], rel=5e-3)

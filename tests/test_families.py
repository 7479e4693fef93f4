"""Families without a closed form: exact parameter tensors from the model on the meta device, ZeRO-3's terms
from them, Hub ids from the local cache, and the one-line errors of the core install.

Expectations come from transformers itself: ``AutoModelForCausalLM.from_config(...).named_parameters()`` of the
real (CPU) model, summed or ceil-divided as DeepSpeed's partitioning does (partition_parameters.py
``_partition_param``).
"""

from __future__ import annotations

import json

import pytest
from zeroest.estimator.core.architecture import count_params, param_tensors, shape_from_config

_DENSE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=300, max_position_embeddings=256)
NEW = {
    "qwen3": dict(model_type="qwen3", head_dim=16, **_DENSE),
    "qwen3_moe": dict(model_type="qwen3_moe", head_dim=16, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=48, decoder_sparse_step=1, **_DENSE),
    "gemma2": dict(model_type="gemma2", head_dim=32, sliding_window=64, **_DENSE),
    "gemma3_text": dict(model_type="gemma3_text", head_dim=32, sliding_window=64, **_DENSE),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, **_DENSE),
    "olmo2": dict(model_type="olmo2", **_DENSE),
    "granite": dict(model_type="granite", **_DENSE),
    "deepseek_v3": dict(model_type="deepseek_v3", hidden_size=64, intermediate_size=160, moe_intermediate_size=32,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, vocab_size=300,
                        n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                        n_group=1, topk_group=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=256),
    "deepseek_v2": dict(model_type="deepseek_v2", hidden_size=64, intermediate_size=160, moe_intermediate_size=32,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, vocab_size=300,
                        n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                        n_group=2, topk_group=1, topk_method="group_limited_greedy", q_lora_rank=None,
                        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                        max_position_embeddings=256),
}


def _torch():
    return pytest.importorskip("torch")


def _real_params(config: dict):
    """(name, numel) of ``named_parameters()`` of the real CPU model, and its buffers' names."""
    _torch()
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    return [(n, p.numel()) for n, p in model.named_parameters()], {n for n, _ in model.named_buffers()}


@pytest.mark.parametrize("family", list(NEW))
def test_parameter_tensors_equal_transformers(family):
    """Names, order and numel of every tensor equal the real model's; the count differs by zero; no buffer."""
    real, buffers = _real_params(NEW[family])
    shape = shape_from_config(NEW[family], family)
    ours = [(t.name, t.numel) for t in param_tensors(shape)]
    assert ours == real
    assert count_params(shape).total - sum(n for _, n in real) == 0
    assert not buffers & {t.name for t in param_tensors(shape)}


def test_tied_embedding_counted_once():
    """gemma2 ties lm_head to the embedding by default: lm_head is absent and the embedding is 300 x 64."""
    _torch()
    shape = shape_from_config(NEW["gemma2"], "gemma2")
    assert shape.tied_embeddings
    parts = count_params(shape)
    assert parts.lm_head == 0 and parts.embeddings == 300 * 64


def test_components_of_moe_and_qk_norms():
    """qwen3_moe: 4 experts x 3 matrices of 64 x 48 and a 64 x 4 router per layer are mlp; q/k norms are norms."""
    _torch()
    parts = count_params(shape_from_config(NEW["qwen3_moe"], "qwen3_moe"))
    assert parts.mlp == 3 * (4 * 3 * 64 * 48 + 64 * 4)
    assert parts.norms == 3 * (2 * 64 + 2 * 16) + 64
    assert parts.lm_head == 300 * 64 and parts.embeddings == 300 * 64


@pytest.mark.parametrize("world", [2, 4])
def test_stage3_partitions_and_persistent_params_from_the_meta_module_tree(world):
    """P3 = sum ceil(n/N) over the real model's parameters; persistent ones (n < threshold) whole on every rank."""
    from zeroest.estimator.core.stage3 import gathered_numel, stage3_states

    real, _ = _real_params(NEW["mixtral"])
    shape = shape_from_config(NEW["mixtral"], "mixtral")
    setup = _stage3_setup(shape, world)
    threshold = setup.zero.param_persistence_threshold
    p3 = sum(-(-n // world) for _, n in real)
    persistent = sum(-(-n // world) * world for _, n in real if n < threshold)
    states = stage3_states(setup)
    assert states.params_bytes == 2 * (persistent + p3)
    assert states.master_weights_bytes == 4 * p3
    big = [n for _, n in real if n >= threshold]
    live = setup.zero.max_live_parameters + setup.zero.prefetch_bucket_size
    assert gathered_numel(setup) == min(sum(big), max(max(big), live))


def _stage3_setup(shape, world: int):
    from zeroest.api import build_setup

    return build_setup(shape, {"stage": 3, "world_size": world, "param_persistence_threshold": 1000,
                               "activations": "closed-form"})


def _fill_hub_cache(root, repo_id: str, config: dict) -> None:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/config.json}."""
    commit = "0" * 40
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(config))


def test_hub_id_from_the_local_cache(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    _torch()
    from zeroest.estimator.catalog.models import load_model

    _fill_hub_cache(tmp_path, "Qwen/Qwen3-Tiny", NEW["qwen3"])
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    shape = load_model("Qwen/Qwen3-Tiny")
    assert shape.name == "Qwen/Qwen3-Tiny" and shape.family == "qwen3"
    assert count_params(shape).total == sum(n for _, n in _real_params(NEW["qwen3"])[0])


def test_hub_id_not_in_the_cache_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    from zeroest.estimator.catalog.models import load_model

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="not in the local Hugging Face cache") as err:
        load_model("Qwen/Qwen3-8B")
    assert "\n" not in str(err.value) and "config.json" in str(err.value)


def test_core_install_names_the_extra(monkeypatch):
    """Without torch/transformers a family with no closed form is one line naming the extra to install."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("torch", "transformers") else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'zeroest\[validate\]'") as err:
        shape_from_config(NEW["olmo2"], "olmo2")
    assert "\n" not in str(err.value)


def test_unknown_model_type_is_one_line():
    _torch()
    with pytest.raises(ValueError, match="cannot build model_type 'no_such_lm'"):
        shape_from_config(dict(model_type="no_such_lm", hidden_size=8), "x.json")


@pytest.mark.parametrize("grad_ckpt", [False, True], ids=["plain", "ckpt"])
@pytest.mark.parametrize("family", ["qwen3", "mixtral", "olmo2", *(pytest.param(f, marks=pytest.mark.slow)
                                                                  for f in ("deepseek_v3", "deepseek_v2"))])
def test_traced_profile_matches_live_bytes_of_a_real_cpu_step(family, grad_ckpt):
    """The tracer, unchanged, on new families: forward_end, forward_peak and backward_peak within 2% of a real
    3-layer CPU step (the measurement of tests/test_activations.py). deepseek: latent attention (v narrower
    than q/k, so the CPU takes sdpa's math path), one dense layer then routed and shared experts; layer 0 of
    the traced pair is the dense one, which the embedding term carries."""
    _torch()
    from test_activations import B, S, _measure
    from zeroest.estimator.trace import polys, tracer

    config = NEW[family]
    profile = polys.profile_from_polys(tracer.trace_polys(config, "bf16", "sdpa", target="cpu"), B, S)
    for name, value in _measure(config, "sdpa", grad_ckpt).items():
        assert getattr(profile, f"{name}_bytes")(grad_ckpt) == pytest.approx(value, rel=0.02), name


def test_trace_model_parameters_in_the_training_dtype():
    """DeepSpeed casts every parameter to bf16 (engine.py ``_cast_module_mixed_precision``), also the router
    weight transformers may keep in fp32 (``_keep_in_fp32_modules_strict``): the traced model does the same."""
    torch = _torch()
    from zeroest.estimator.trace.model import build_model

    model = build_model(NEW["deepseek_v3"], "bf16", "sdpa", device="meta", num_layers=None)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert len(list(model.parameters())) == len(param_tensors(shape_from_config(NEW["deepseek_v3"], "ds")))


def test_a_family_read_off_the_model_is_kept_per_config_and_transformers_version(tmp_path, monkeypatch):
    """The second read of the same config.json comes from the shape cache (the model is not built, transformers
    not consulted); another transformers version reads the model again."""
    _torch()
    from zeroest.estimator.trace import generic, tracer

    monkeypatch.setenv("ZEROEST_CACHE_DIR", str(tmp_path))
    first = shape_from_config(NEW["olmo2"], "olmo2")
    tensors = generic.meta_param_tensors(first)
    assert len(list((tmp_path / "shapes").glob("*.json"))) == 1

    def build(*args, **kwargs):
        raise AssertionError("read the model again")

    monkeypatch.setattr(generic, "hf_config_object", build)
    monkeypatch.setattr(generic, "meta_model", build)
    again = shape_from_config(NEW["olmo2"], "olmo2")
    assert again == first and hash(again) == hash(first)
    assert generic.meta_param_tensors(again) == tensors
    versions = tracer.library_versions()
    monkeypatch.setattr(tracer, "library_versions", lambda: {**versions, "transformers": "0.0.other"})
    with pytest.raises(AssertionError, match="read the model again"):
        shape_from_config(NEW["olmo2"], "olmo2")


def test_a_corrupt_shape_cache_file_is_read_again_with_one_warning(tmp_path, monkeypatch, caplog):
    _torch()
    from zeroest.estimator.trace import generic

    monkeypatch.setenv("ZEROEST_CACHE_DIR", str(tmp_path))
    first = shape_from_config(NEW["granite"], "granite")
    (path,) = (tmp_path / "shapes").glob("*.json")
    path.write_text("{not json")
    with caplog.at_level("WARNING", logger=generic.__name__):
        again = shape_from_config(NEW["granite"], "granite")
    assert again == first
    assert [r.message for r in caplog.records if "shape cache" in r.message][0].startswith(
        f"ignoring the model shape cache file {path}")
    assert json.loads(path.read_text())["shape"]["num_layers"] == 3

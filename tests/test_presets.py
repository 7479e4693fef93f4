"""Presets, config files, and the standard shape for ``--params``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zeroest.estimator.catalog.models import (
    GPT3_TABLE,
    INTERMEDIATE_MULTIPLES,
    STANDARD_VOCAB,
    list_presets,
    load_model,
    standard_shape,
)
from zeroest.estimator.core.architecture import count_params

EXPECTED_PRESETS = [
    "gemma-2b", "gpt2", "gpt2-large", "gpt2-medium", "gpt2-xl", "llama-2-13b", "llama-2-70b",
    "llama-2-7b", "llama-3-70b", "llama-3-8b", "mistral-7b", "opt-1.3b", "opt-125m", "phi-3-mini",
    "pythia-1.4b", "pythia-12b", "pythia-160m", "pythia-1b", "pythia-2.8b", "pythia-410m", "pythia-6.9b",
    "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-14b", "qwen2.5-32b", "qwen2.5-3b", "qwen2.5-72b",
    "qwen2.5-7b", "tinyllama-1.1b",
]
GPT2_CONFIG = {"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12}


def test_list_presets() -> None:
    assert list_presets() == EXPECTED_PRESETS


@pytest.mark.parametrize("name", EXPECTED_PRESETS)
def test_every_preset_loads_with_a_positive_size(name: str) -> None:
    shape = load_model(name)
    assert shape.name == name
    assert count_params(shape).total > 0 and shape.num_layers > 0 and shape.hidden_size > 0


def test_broken_preset_names_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import zeroest.estimator.catalog.models as models

    (tmp_path / "bad.json").write_text('{"model_type": "llama",}')
    monkeypatch.setattr(models, "_models_dir", lambda: tmp_path)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'bad.json'}:1:24: invalid JSON"):
        load_model("bad")


def test_load_preset_case_insensitive() -> None:
    shape = load_model("Llama-2-7B")
    assert (shape.name, shape.family, shape.hidden_size) == ("llama-2-7b", "llama", 4096)


def test_load_config_file_and_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(GPT2_CONFIG))
    from_file = load_model(str(tmp_path / "config.json"))
    from_dir = load_model(str(tmp_path))
    assert from_file.name == str(tmp_path / "config.json")
    assert count_params(from_file).total == count_params(from_dir).total == 124_439_808


def test_unknown_name_suggests_presets() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'llama-7b'.*did you mean llama-2-7b.*zeroest models"):
        load_model("llama-7b")


def test_unknown_name_without_close_match() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'zzzz': not a preset or a file \(`zeroest models` lists"):
        load_model("zzzz")


def test_malformed_json_names_file_line_column(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "llama",\n  "hidden_size": 64,,\n}')
    with pytest.raises(ValueError, match=rf"{path}:2:21: invalid JSON"):
        load_model(str(path))


def test_json_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_model(str(path))


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no config.json"):
        load_model(str(tmp_path))


def test_config_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    with pytest.raises(ValueError, match=rf"config '{path}' has no 'hidden_size'"):
        load_model(str(path))


@pytest.mark.parametrize("row", GPT3_TABLE, ids=lambda row: f"{row.n_params:.2g}")
def test_standard_shape_at_gpt3_rows(row) -> None:
    """At each size of GPT-3's Table 2.1, depth, width and heads are that row's; the total is within 1%."""
    shape = standard_shape(row.n_params)
    assert (shape.num_layers, shape.hidden_size) == (row.num_layers, row.hidden_size)
    assert shape.head_dim == row.head_dim
    assert shape.num_heads == shape.num_kv_heads == row.hidden_size // row.head_dim
    assert count_params(shape).total == pytest.approx(row.n_params, rel=0.01)


def test_standard_shape_is_llama_style() -> None:
    shape = standard_shape(1_300_000_000)
    assert shape.name == "1.3B (standard llama-style shape)"
    assert (shape.family, shape.vocab_size) == ("llama", STANDARD_VOCAB)
    assert (shape.norm, shape.positions) == ("rmsnorm", "rotary")
    assert shape.gated_mlp and not shape.tied_embeddings and not shape.attention_bias
    assert standard_shape(175_000_000_000).intermediate_size % 256 == 0


@settings(max_examples=150, deadline=None)
@given(st.floats(min_value=math.log(125e6), max_value=math.log(175e9)))
def test_standard_shape_within_one_percent(log_n: float) -> None:
    n_params = round(math.exp(log_n))
    shape = standard_shape(n_params)
    assert count_params(shape).total == pytest.approx(n_params, rel=0.01)
    assert shape.hidden_size % shape.head_dim == 0
    assert any(shape.intermediate_size % m == 0 for m in INTERMEDIATE_MULTIPLES)


def test_standard_shape_depth_and_width_grow_with_size() -> None:
    shapes = [standard_shape(round(10 ** (8 + k / 4))) for k in range(14)]  # 100M .. 178B
    assert [s.num_layers for s in shapes] == sorted(s.num_layers for s in shapes)
    assert [s.hidden_size for s in shapes] == sorted(s.hidden_size for s in shapes)


@pytest.mark.parametrize("bad", [0, -5, True, 1.3e9])
def test_standard_shape_rejects_non_counts(bad) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        standard_shape(bad)


def test_standard_shape_too_small() -> None:
    with pytest.raises(ValueError, match="within 1% of 1,000,000 parameters"):
        standard_shape(1_000_000)

"""Trainable/frozen counts of core.adapters: closed form from named terms, and against peft on the meta device."""

from __future__ import annotations

import pytest
from zeroest.estimator.catalog.models import load_model
from zeroest.estimator.configs.flat import setup_from_dict, setup_to_dict
from zeroest.estimator.core.adapters import Adapters, trainable_split
from zeroest.estimator.core.architecture import count_params


def test_default_is_a_full_fine_tune():
    model = load_model("llama-3-8b")
    split = trainable_split(model, Adapters())
    assert Adapters().full
    assert split.frozen == () and split.trainable_numel == count_params(model).total


@pytest.mark.parametrize("rank", [8, 64])
def test_llama_q_v_closed_form(rank):
    """Per layer, q_proj (h -> q) and v_proj (h -> kv) add r (h + q) + r (h + kv)."""
    m = load_model("llama-3-8b")
    split = trainable_split(m, Adapters(lora_rank=rank, lora_targets="q_proj,v_proj"))
    h, q, kv = m.hidden_size, m.q_hidden_size, m.kv_hidden_size
    assert split.trainable_numel == m.num_layers * rank * ((h + q) + (h + kv))
    assert split.frozen_numel == count_params(m).total


def test_all_linear_skips_lm_head_and_modules_to_save_copies_it():
    m = load_model("llama-3-8b")
    r, h, q, kv, f = 16, m.hidden_size, m.q_hidden_size, m.kv_hidden_size, m.intermediate_size
    per_layer = r * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + f) + (f + h))
    split = trainable_split(m, Adapters(lora_rank=r, modules_to_save="lm_head"))
    assert split.trainable_numel == m.num_layers * per_layer + m.vocab_size * h


def test_freeze_patterns():
    m = load_model("llama-3-8b")
    c = count_params(m)
    split = trainable_split(m, Adapters(freeze="embeddings,layers:2"))
    layer = (c.attention + c.mlp) // m.num_layers + 2 * m.hidden_size
    assert split.frozen_numel == c.embeddings + 2 * layer


@pytest.mark.parametrize("bad", [{"lora_rank": -1}, {"lora_targets": ""}, {"freeze": "layers:x"}])
def test_bad_input_is_a_value_error(bad):
    with pytest.raises(ValueError):
        Adapters(**bad)


def test_flat_round_trip():
    setup = setup_from_dict({"model": "llama-3-8b", "lora_rank": 8, "lora_targets": "q_proj"})
    flat = setup_to_dict(setup)
    assert flat["lora_rank"] == 8 and flat["lora_targets"] == "q_proj"
    assert setup_from_dict(flat).adapters == setup.adapters


@pytest.mark.parametrize(("preset", "targets", "saved"), [
    ("llama-3-8b", "all-linear", ""), ("qwen2.5-7b", "q_proj,v_proj", "lm_head"),
    ("gpt2", "all-linear", ""), ("pythia-1b", "query_key_value", "embed_in"),
])
def test_counts_match_peft_on_meta(preset, targets, saved):
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from zeroest.estimator.catalog.models import load_config
    from zeroest.estimator.trace.model import build_model

    m = load_model(preset)
    hf = build_model(load_config(preset)[1], "bf16", "sdpa", num_layers=None)
    lora = peft.LoraConfig(r=8, target_modules=targets if targets == "all-linear" else targets.split(","),
                           modules_to_save=saved.split(",") if saved else None)
    pm = peft.get_peft_model(hf, lora)
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    total = sum(p.numel() for p in pm.parameters())
    split = trainable_split(m, Adapters(lora_rank=8, lora_targets=targets, modules_to_save=saved))
    assert split.trainable_numel == trainable
    assert split.total_numel == total

"""The validator trains what a LoRA setup says: peft wraps the real model, the freeze patterns freeze the real
parameters, and the counts equal the estimator's (``validate.adapters``); several grids run as one.

Expected counts from named terms, tiny llama (h 64, kv 32, MLP 128, 2 layers, vocab 1000, untied): LoRA of rank r on
every Linear but lm_head adds r (in + out) per wrapped weight, per layer
r ((h + h) + 2 (h + kv) + (h + h) + 2 (h + f) + (f + h)) = 1024 r.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from zeroest.estimator.core.architecture import count_params, shape_from_config
from zeroest.validate.grid import load_grids

from zeroest.report.runs import read_rows, run_label

TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000, max_position_embeddings=128, tie_word_embeddings=False)
PER_LAYER_PER_RANK = 1024


def test_run_label_names_the_adapters():
    setup = {"model": "llama-3-8b", "stage": 2, "world_size": 2, "micro_batch": 1, "seq_len": 1024,
             "dtype": "bf16", "optimizer": "adamw", "optimizer_impl": "torch", "lora_rank": 16, "freeze": ""}
    assert run_label(setup, True) == "llama-3-8b z2 N=2(sim) mb1x1024 bf16 adamw/torch lora:r16"
    assert run_label({**setup, "lora_rank": None, "freeze": "layers:2"}, False).endswith("adamw/torch freeze:layers:2")


def _grid(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_several_grids_run_as_one(tmp_path):
    a = _grid(tmp_path, "a.yaml", """\
        models: {tiny: {model_type: gpt2, n_layer: 2, n_embd: 64, n_head: 2, vocab_size: 1024, n_positions: 64}}
        runs: [{model: tiny, stage: 1}, {model: tiny, stage: 2}]
        """)
    b = _grid(tmp_path, "b.yaml", "runs: [{model: gpt2, stage: 3}]\n")
    grid = load_grids([a, b])
    assert [e.setup["stage"] for e in grid.entries] == [1, 2, 3] and set(grid.models) == {"tiny"}
    clash = _grid(tmp_path, "c.yaml", """\
        models: {tiny: {model_type: gpt2, n_layer: 4, n_embd: 64, n_head: 2, vocab_size: 1024, n_positions: 64}}
        runs: [{model: tiny, stage: 1}]
        """)
    with pytest.raises(ValueError, match="model 'tiny' is defined differently"):
        load_grids([a, clash])


@pytest.mark.slow
@pytest.mark.deepspeed
def test_lora_and_freeze_rows_on_the_cpu(tmp_path):
    pytest.importorskip("deepspeed")
    pytest.importorskip("peft")
    grid = _grid(tmp_path, "lora.yaml", f"""\
        models: {{tiny: {json.dumps(TINY)}}}
        defaults: {{model: tiny, dtype: bf16, optimizer_impl: torch, micro_batch: 2, seq_len: 32, simulate: true,
                    loop: trainer}}
        runs:
          - {{stage: 2, world_size: 4, lora_rank: 8}}
          - {{stage: 3, world_size: 2, lora_rank: 4, grad_ckpt: true, zero_init: true}}
          - {{stage: 1, world_size: 2, freeze: "embeddings,layers:1"}}
        """)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "zeroest.validate", "--cpu", "--grid", grid, "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {(r["setup"]["stage"]): r for r in read_rows(out / "runs.jsonl")}
    assert all(r["status"] == "ok" for r in rows.values()), [r.get("error") for r in rows.values()]
    total = count_params(shape_from_config(TINY, "tiny")).total
    layers = TINY["num_hidden_layers"]
    assert rows[2]["measured"]["trainable_params"] == layers * PER_LAYER_PER_RANK * 8
    assert rows[2]["measured"]["frozen_params"] == total
    assert rows[3]["measured"]["trainable_params"] == layers * PER_LAYER_PER_RANK * 4
    # freeze: the embedding (V h) and layer 0 are frozen; layer 1, the final norm and lm_head train
    h, v = TINY["hidden_size"], TINY["vocab_size"]
    layer = (total - 2 * v * h - h) // layers
    assert rows[1]["measured"]["frozen_params"] == v * h + layer
    assert rows[1]["measured"]["trainable_params"] == total - v * h - layer

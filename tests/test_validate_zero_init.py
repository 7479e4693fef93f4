"""The validator builds ZeRO-3 models under ``deepspeed.zero.Init`` when the setup says ``zero_init``, as
transformers does for a user (an ``HfDeepSpeedConfig`` alive before ``from_config``).

Rank 0 of an N-rank job on the fake process group, on the CPU, memory from live tensor storages
(``validate.memtrack.LiveBytes``). After the build, a rank holds

* with zero_init: ``b * sum_t ceil(n_t / N)`` bytes of parameters (each tensor padded to a multiple of N,
  partition_parameters.py ``_partition_param``), plus the model's buffers;
* without: ``b * P`` (the whole model, P = ``count_params(shape).total``), plus the buffers;

with b = 2 bytes for bf16.
"""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest
from zeroest.estimator.configs.ds_write import ds_config
from zeroest.estimator.configs.flat import setup_from_dict, setup_to_dict
from zeroest.estimator.core.architecture import count_params, param_tensors, shape_from_config
from zeroest.estimator.core.stage3 import partition_numel
from zeroest.validate.worker import _check_accelerate_flag, builds_under_zero_init

BF16 = 2
"""Bytes per bf16 parameter."""
TINY_LLAMA = {
    "model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 4096, "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
TINY_GPT2 = {  # odd widths: biases of 100 and 300 elements need padding to a multiple of N
    "model_type": "gpt2", "n_layer": 2, "n_embd": 100, "n_head": 4, "n_inner": 400, "vocab_size": 1001,
    "n_positions": 64, "tie_word_embeddings": True,
}


def _spec(config: dict, *, world_size: int, zero_init: bool, stage: int = 3) -> dict:
    shape = shape_from_config(config, "tiny")
    setup = setup_from_dict(
        {"stage": stage, "world_size": world_size, "dtype": "bf16", "optimizer_impl": "torch", "micro_batch": 1,
         "seq_len": 16, "zero_init": zero_init},
        model=shape,
    )
    return {"setup": setup_to_dict(setup), "model_config": dict(config), "ds_config": ds_config(setup),
            "device": "cpu", "pretrained": None}


@pytest.mark.parametrize(
    ("stage", "zero_init", "under"), [(3, True, True), (3, False, False), (2, True, False), (0, True, False)]
)
def test_only_stage_3_with_zero_init_builds_under_zero_init(stage, zero_init, under):
    assert builds_under_zero_init({"stage": stage, "zero_init": zero_init}) is under


@pytest.mark.parametrize(
    ("env_flag", "zero_init", "refused"),
    [("true", True, False), ("false", False, False), ("false", True, True), ("true", False, True), (None, True, False)],
)
def test_accelerate_flag_must_match_the_setup(monkeypatch, env_flag, zero_init, refused):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    if env_flag is None:
        monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO3_INIT", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO3_INIT", env_flag)
    spec = {"setup": {"stage": 3, "zero_init": zero_init}}
    if refused:
        with pytest.raises(ValueError, match=f"zero3_init_flag {env_flag} but the run's setup has zero_init"):
            _check_accelerate_flag(spec)
    else:
        _check_accelerate_flag(spec)


@pytest.fixture
def fake_world():
    """Tear the fake world down after the test, so later tests in this process see no process group."""
    yield
    from zeroest.validate.fakepg import close_world

    close_world()


def _build_rank0(spec: dict) -> tuple[int, int, bool, int]:
    """(live bytes after the build, peak bytes during it, partitioned?, buffer bytes) of rank 0."""
    from zeroest.validate.fakepg import init_fake_world
    from zeroest.validate.memtrack import LiveBytes, storage_bytes
    from zeroest.validate.worker import build_model, hf_deepspeed_config, partitioned

    init_fake_world(0, int(spec["setup"]["world_size"]))
    hf_config = hf_deepspeed_config(spec)
    tracker = LiveBytes(device="cpu")
    try:
        with tracker, tracker.phase("build") as build:
            model = build_model(spec)
            gc.collect()  # the tied lm_head's own partition is freed with a reference cycle, not at once
        buffers = storage_bytes(model.buffers())
        return tracker.live_bytes, build.peak_bytes, partitioned(model), buffers
    finally:
        del hf_config  # transformers holds a weakref only: is_deepspeed_zero3_enabled() is False again


@pytest.mark.deepspeed
@pytest.mark.slow
@pytest.mark.parametrize("config", [TINY_LLAMA, TINY_GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("world_size", [4, 8])
def test_zero_init_build_holds_one_partition_per_rank(config, world_size, fake_world):
    pytest.importorskip("deepspeed")
    shape = shape_from_config(config, "tiny")
    whole = BF16 * count_params(shape).total
    partition = BF16 * sum(partition_numel(t.numel, world_size) for t in param_tensors(shape))
    assert whole / world_size <= partition < whole / world_size + BF16 * world_size * len(param_tensors(shape))

    live, peak, is_partitioned, buffers = _build_rank0(_spec(config, world_size=world_size, zero_init=True))
    assert is_partitioned
    assert live - buffers == partition
    # never whole: at most one module's parameters are gathered at once (initialize_weights_zero3)
    largest = BF16 * max(t.numel for t in param_tensors(shape))
    assert peak < partition + buffers + 2 * largest < whole

    live, peak, is_partitioned, buffers = _build_rank0(_spec(config, world_size=world_size, zero_init=False))
    assert not is_partitioned
    assert live - buffers == whole
    assert peak >= whole


@pytest.mark.deepspeed
@pytest.mark.slow
def test_validate_rows_record_zero_init_and_the_build(tmp_path):
    """Both builds end to end through ``zeroest validate --cpu``: the rows say what was run, the zero_init
    build holds 1/N_d of the parameters, and after ``deepspeed.initialize`` the two engines hold the same."""
    world = 8
    grid = tmp_path / "g.yaml"
    fields = ", ".join(f"{k}: {v}" for k, v in TINY_LLAMA.items()).replace("False", "false")
    grid.write_text(
        f"models:\n  tiny-llama: {{{fields}}}\n"
        f"defaults: {{model: tiny-llama, stage: 3, world_size: {world}, simulate: true, dtype: bf16,"
        " optimizer_impl: torch, micro_batch: 1, seq_len: 32}\n"
        "runs:\n  - {zero_init: true}\n  - {zero_init: false}\n"
    )
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "zeroest.validate", "--cpu", "--grid", str(grid), "--out", str(out), "--jobs", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    from zeroest.report.runs import read_rows

    rows = {row["setup"]["zero_init"]: row for row in read_rows(out / "runs.jsonl")}
    assert set(rows) == {True, False}
    shape = shape_from_config(TINY_LLAMA, "tiny-llama")
    whole = BF16 * count_params(shape).total
    partition = BF16 * sum(partition_numel(t.numel, world) for t in param_tensors(shape))
    buffers = 2 * 4 * (TINY_LLAMA["hidden_size"] // TINY_LLAMA["num_attention_heads"] // 2)  # fp32 inv_freq x2
    for zero_init, row in rows.items():
        measured = row["measured"]
        assert row["status"] == "ok" and row["simulated"] and row["world_size"] == world
        assert measured["built_partitioned"] is zero_init
        assert measured["phases"]["build"]["allocated_bytes"] == (partition if zero_init else whole) + buffers
    init = [rows[z]["measured"]["phases"]["init"]["allocated_bytes"] for z in (True, False)]
    assert init[0] == pytest.approx(init[1], rel=1e-3)
    built = rows[True]["measured"]["phases"]["build"]["peak_allocated_bytes"]  # the zero.Init build counts
    assert rows[True]["measured"]["peak_allocated_bytes"] >= built


@pytest.mark.deepspeed
@pytest.mark.parametrize("flag", [True, False])
def test_accelerate_enables_zero_init_whatever_its_flag(flag):
    """Why the worker makes no Accelerator: accelerate's ``set_deepspeed_weakref`` (run when ``Accelerator()``
    selects the plugin) creates an HfDeepSpeedConfig for a stage-3 config with the flag true or false."""
    pytest.importorskip("accelerate")
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    spec = _spec(TINY_LLAMA, world_size=4, zero_init=flag)
    plugin = DeepSpeedPlugin(hf_ds_config=spec["ds_config"], zero3_init_flag=flag)
    try:
        plugin.set_deepspeed_weakref()
        assert plugin.is_zero3_init_enabled() is flag
        assert is_deepspeed_zero3_enabled()
    finally:
        unset_hf_deepspeed_config()

"""``zeroest.watch``: the user's own DeepSpeed loop as a validation run.

Fast tests check the pieces on plain objects (the loop seen through a weak reference, the divergence rule, the
setup read off an engine's accessors). The slow test runs a real 2-rank gloo job under torchrun (a tiny llama,
ZeRO-2, bf16, accumulation 2) with ``with zeroest.watch(engine, out=...)`` around a custom loop, and checks the
rows against the report's reader and the estimate.

CPU bounds, derived: the watch adopts every live CPU tensor when it starts, after ``deepspeed.initialize`` and
before the first step, so the live bytes then are the model states DeepSpeed holds at that point: the 16-bit
parameters (2 Psi, whole below stage 3) and this rank's fp32 master partition (4 Psi / N_d); the estimate's
``params`` + ``master_weights`` must match them within 0.1% (a few rotary buffers, the loss scaler's scalars).
The phases add activations and optimizer states: each must be the prediction within 0.5%, plus, until the
estimator models the loop (a ``loop`` key in the flat setup), the logits the custom loop keeps alive, b s V
16-bit elements (``retained_bytes``): measured here as exactly that term.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref
from types import SimpleNamespace

import pytest

import zeroest
from zeroest.integrations.compare import PhaseCheck, check_phases
from zeroest.watch import Watch, _LoopSeen

TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000, max_position_embeddings=128)


class _Out:
    """A stand-in for a ModelOutput (weak-referenceable)."""


def _seen(script: str) -> str:
    """Run a loop described by letters: f forward (keeps the output), d delete it, b backward."""
    seen, out = _LoopSeen(), None
    for op in script:
        if op == "f":
            seen.before_forward()
            out = _Out()  # reassigned after the forward returns, as ``outputs = model(...)`` does
            seen.after_forward(out)
        elif op == "d":
            out = None
        elif op == "b":
            seen.before_backward()
    del out
    return seen.verdict()[0]


@pytest.mark.parametrize("script, loop", [("fdbfdb", "trainer"), ("fbdfbd", "custom-del"), ("fbfb", "custom"),
                                          ("fdbfbfb", "custom")])
def test_loop_is_seen_through_a_weak_reference(script, loop):
    assert _seen(script) == loop


def test_an_unseen_loop_is_the_conservative_one():
    loop, note = _LoopSeen().verdict()
    assert loop == "custom" and "assumed custom" in note


@pytest.mark.parametrize("measured, predicted, warned", [
    (100, 104, False),   # 4% over: within 5%
    (100, 94, True),     # 6% under
    (100, 98.5, True),   # 1.5% under: always warned
    (100, 99.5, False),  # 0.5% under: within the 1% tolerance
    (100, 106, True),    # 6% over
])
def test_divergence_rule(measured, predicted, warned):
    check = PhaseCheck(phase="forward", measured_bytes=int(measured * 1000), predicted_bytes=int(predicted * 1000))
    assert check.diverges(0.05) is warned
    assert check.error == pytest.approx((predicted - measured) / measured)


def test_only_measured_and_predicted_phases_are_checked():
    checks = check_phases({"forward": 10, "backward": 0}, {"forward": 11, "backward": 12, "step": 13})
    assert [(c.phase, c.error) for c in checks] == [("forward", pytest.approx(0.1))]


@pytest.mark.parametrize("kwargs, word", [(dict(steps=0), "steps"), (dict(threshold=5), "threshold"),
                                          (dict(loop="fast"), "loop")])
def test_bad_arguments_are_one_clear_error(kwargs, word):
    with pytest.raises(ValueError, match=word):
        Watch(_fake_engine(), **kwargs)


def test_not_an_engine_is_refused():
    with pytest.raises(ValueError, match="DeepSpeed engine"):
        zeroest.watch(object())


def test_zeroest_watch_is_callable_both_ways():
    import zeroest.watch as module

    assert isinstance(zeroest.watch(_fake_engine()), Watch)
    assert isinstance(module(_fake_engine()), Watch)


def _fake_engine(stage: int = 2, micro: int = 2):
    """An object with DeepSpeedEngine's accessors (deepspeed/runtime/engine.py) and an HF model."""
    from transformers import AutoConfig

    config_dict = dict(TINY)
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    optimizer = type("FusedAdam", (), {"adam_w_mode": True, "param_groups": [{}]})()
    values = dict(zero_optimization_stage=stage, zero_overlap_comm=stage == 3, zero_contiguous_gradients=True,
                  zero_reduce_bucket_size=200_000, zero_allgather_bucket_size=300_000,
                  zero_prefetch_bucket_size=50_000_000, zero_max_live_parameters=10**9,
                  zero_param_persistence_threshold=100_000, zero_sub_group_size=10**9, zero_offload_optimizer=None,
                  zero_offload_param=None, train_micro_batch_size_per_gpu=micro, bfloat16_enabled=True,
                  fp16_enabled=False, gradient_accumulation_steps=4)
    engine = SimpleNamespace(**{k: (lambda v=v: v) for k, v in values.items()}, basic_optimizer=optimizer,
                             module=SimpleNamespace(config=config), forward=lambda: None, backward=lambda: None,
                             step=lambda: None)
    return engine


def test_setup_is_read_off_the_engine():
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    from zeroest.estimator.configs import flat

    from zeroest.integrations.engine import live_setup, world

    setup, notes = live_setup(_fake_engine(stage=3), micro_batch=2, seq_len=64, model_name="models/tiny.json",
                              loop="custom")
    # world size is the process group's (other tests in this process may have made one), else 1
    assert (setup.stage, setup.world_size, setup.dtype) == (3, world()[0], "bf16")
    assert (setup.zero.reduce_bucket_size, setup.zero.allgather_bucket_size) == (200_000, 300_000)
    assert (setup.workload.micro_batch, setup.workload.seq_len, setup.workload.grad_accum) == (2, 64, 4)
    assert (setup.optimizer.name, setup.optimizer.impl) == ("adamw", "fused")
    assert setup.zero.zero_init is False and any("zero.Init" in n for n in notes)
    assert setup.model.vocab_size == TINY["vocab_size"] and setup.model.name == "models/tiny.json"
    if "loop" in flat.SETUP_KEYS:
        assert flat.setup_to_dict(setup)["loop"] == "custom"


def test_a_batch_other_than_the_configured_micro_batch_is_noted():
    pytest.importorskip("transformers")
    from zeroest.integrations.engine import live_setup

    setup, notes = live_setup(_fake_engine(micro=4), micro_batch=2, seq_len=64, model_name="tiny")
    assert setup.workload.micro_batch == 2 and any("micro-batch is 4" in n for n in notes)


@pytest.mark.parametrize(("conf", "expandable", "noted"), [
    ("expandable_segments:True", True, False), ("", False, False),
    ("max_split_size_mb:128,expandable_segments:False", False, True)])
def test_the_allocator_settings_are_read_off_the_jobs_environment(monkeypatch, conf, expandable, noted):
    pytest.importorskip("transformers")
    from zeroest.integrations.engine import live_setup

    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", conf)
    setup, notes = live_setup(_fake_engine(), micro_batch=2, seq_len=64, model_name="tiny")
    assert setup.expandable_segments is expandable
    assert any("max_split_size_mb not modelled" in n for n in notes) is noted


def test_loop_seen_holds_no_strong_reference():
    seen, out = _LoopSeen(), _Out()
    seen.after_forward(out)
    ref = weakref.ref(out)
    del out
    assert ref() is None and seen.ref() is None


# -- real DeepSpeed, two gloo ranks ---------------------------------------------------------------------------

LOOP = r'''
import json, os, sys, warnings
warnings.simplefilter("ignore")
import torch, deepspeed
from transformers import AutoConfig, AutoModelForCausalLM
import zeroest

deepspeed.init_distributed(dist_backend="gloo")
spec = json.loads(sys.argv[1])
config = dict(spec["model"])
model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config),
                                         dtype=torch.bfloat16)
model.config.use_cache = False
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=spec["ds_config"])
gen = torch.Generator().manual_seed(1 + engine.global_rank)
with zeroest.watch(engine, steps=2, out=spec["out"]) as w:
    for _ in range(6):
        ids = torch.randint(0, spec["model"]["vocab_size"], (2, 32), generator=gen)
        outputs = engine(input_ids=ids, labels=ids)
        engine.backward(outputs.loss)
        engine.step()
assert "forward" not in engine.__dict__, "the engine's methods were not restored"
with open(f"result-{os.environ['RANK']}.json", "w") as f:  # a file per rank: ranks share one stdout pipe
    json.dump({"loop": w.result.loop, "written": w.result.rows_written}, f)
'''


def torchrun(tmp_path, script: str, spec: dict, nproc: int = 2, timeout: float = 600) -> list[dict]:
    """Run ``script`` on ``nproc`` gloo ranks; the result each rank wrote to ``result-RANK.json`` in rank order.

    Files, not stdout: the ranks write to one pipe, and a rank's line can be cut by another's output."""
    path = tmp_path / "job.py"
    path.write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(29400 + os.getpid() % 500), str(path), json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    files = sorted(tmp_path.glob("result-*.json"), key=lambda f: int(f.stem.split("-")[1]))
    return [json.loads(f.read_text()) for f in files]


DS_CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "bf16": {"enabled": True},
             "zero_optimization": {"stage": 2, "reduce_bucket_size": 200_000, "allgather_bucket_size": 200_000},
             "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}


def retained_bytes(setup, loop: str) -> int:
    """What a ``custom`` loop keeps alive that the estimate leaves out until it models the loop: the output's
    logits, b s V in the model's 16-bit dtype (issue 11); nothing once the setup has a ``loop`` key."""
    from zeroest.estimator.configs import flat

    if loop == "trainer" or "loop" in flat.SETUP_KEYS:
        return 0
    w = setup.workload
    return w.micro_batch * w.seq_len * setup.model.vocab_size * 2


def check_rows(path, ranks: int, loop: str, data_bytes: int = 0, step_extra: int = 0) -> list[dict]:
    """The rows parse with the report's reader and join; start bytes and phases against the estimate (module
    docstring). ``data_bytes``: the job's data set, alive on the CPU when the watch starts; ``step_extra``: a
    named term the step holds beyond the estimate."""
    from zeroest.estimator.core.architecture import count_params

    from zeroest.report.join import join_rows
    from zeroest.report.load import load_runs

    loaded = load_runs([path])
    assert not loaded.skipped and len(loaded.rows) == ranks
    records, skipped = join_rows(list(loaded.rows))
    assert not skipped and len(records) == ranks
    assert len({r.row.run_key for r in records}) == 1
    for record in records:
        row = record.row.data
        assert row["measured"]["source"] == "watch" and row["run_key"].startswith("watch-")
        assert row["measured"]["loop_seen"] == loop and row["status"] == "ok"
        setup = record.setup
        psi = count_params(setup.model).total
        states = 2 * psi + -(-4 * psi // setup.world_size)
        assert row["measured"]["start_allocated_bytes"] == pytest.approx(states + data_bytes, rel=1e-3)
        predicted = record.current.phases
        assert set(record.measured_phases) == {"forward", "backward", "step"}
        for phase, measured in record.measured_phases.items():
            extra = retained_bytes(setup, loop) + data_bytes + (step_extra if phase == "step" else 0)
            assert measured - predicted[phase] == pytest.approx(extra, abs=0.005 * measured), phase
    return records


@pytest.mark.slow
@pytest.mark.deepspeed
def test_custom_loop_on_two_gloo_ranks(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "runs" / "watch.jsonl"
    results = torchrun(tmp_path, LOOP, {"model": TINY, "ds_config": DS_CONFIG, "out": str(out)})
    assert results == [{"loop": "custom", "written": 1}] * 2
    records = check_rows(out, ranks=2, loop="custom")
    assert {r.row.data["rank"] for r in records} == {0, 1}
    assert all(r.setup.world_size == 2 and r.setup.workload.grad_accum == 2 for r in records)
    assert (out.parent / records[0].row.data["setup"]["model"]).is_file()

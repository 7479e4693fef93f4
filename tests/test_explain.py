"""explain(): shares of the peak and knob savings, each equal to re-running estimate() with one knob."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
from zeroest.estimator.catalog.models import load_model
from zeroest.estimator.core.estimate import estimate
from zeroest.estimator.core.setup import Optimizer, Parallelism, TrainingSetup, Workload, ZeroConfig
from zeroest.estimator.plan.explain import explain, knob_changes, knobs

MODEL = load_model("qwen2.5-0.5b")


def setup_of(world=4, stage=1, mb=8, ckpt=False) -> TrainingSetup:
    return TrainingSetup(
        model=MODEL,
        parallel=Parallelism(gpus_per_node=world),
        optimizer=Optimizer(),
        zero=ZeroConfig(stage=stage),
        workload=Workload(micro_batch=mb, seq_len=1024, grad_ckpt=ckpt, activations="closed-form"),
    )


def test_knob_savings_are_reestimates():
    est = estimate(setup_of())
    found = knobs(est)
    assert {k.name for k in found} == {name for name, _ in knob_changes(est.setup)}
    for knob in found:
        assert knob.device_bytes == estimate(knob.setup).device_bytes
        assert knob.saved_bytes == est.device_bytes - knob.device_bytes
    assert [k.saved_bytes for k in found] == sorted((k.saved_bytes for k in found), reverse=True)


def gib_after(text: str, line: str) -> float:
    """The number of GiB printed right after ``text`` in ``line``."""
    match = re.search(re.escape(text) + r" ([0-9.]+) GiB", line)
    assert match, (text, line)
    return float(match.group(1))


def test_explain_lines_carry_the_numbers():
    est = estimate(setup_of())
    lines = explain(est)
    assert gib_after("the peak is", lines[0]) == pytest.approx(est.peak_allocated_bytes / 2**30, abs=0.05)
    biggest, size = max(est.components.items(), key=lambda kv: kv[1])
    share = next(line for line in lines if line.startswith(f"{biggest} are "))
    percent, shown = re.search(r"(\d+)% of the peak \(([0-9.]+) GiB\)", share).groups()
    assert int(percent) == pytest.approx(100 * size / est.peak_allocated_bytes, abs=0.5)
    assert float(shown) == pytest.approx(size / 2**30, abs=0.05)
    best = next(k for k in knobs(est) if k.saved_bytes > 0)
    saving = next(line for line in lines if line.startswith(f"{best.name} saves"))
    assert gib_after(f"{best.name} saves", saving) == pytest.approx(best.saved_bytes / 2**30, abs=0.05)
    assert lines[-1] == f"the knob that frees the most: {best.name}"


def test_checkpointing_saving_equals_activation_difference():
    est = estimate(setup_of())
    ckpt = next(k for k in knobs(est) if k.name == "gradient checkpointing")
    assert ckpt.saved_bytes == est.device_bytes - estimate(setup_of(ckpt=True)).device_bytes
    assert ckpt.saved_bytes > 0


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_single_gpu_says_zero_cannot_help(stage):
    est = estimate(setup_of(world=1, stage=stage))
    lines = explain(est)
    assert f"ZeRO-{stage + 1}..3 cannot help here: N_d = 1, so there is nothing to partition over" in lines
    assert not any(name.startswith("ZeRO-") for name, _ in knob_changes(est.setup))


def test_no_ckpt_knob_when_already_on():
    names = [name for name, _ in knob_changes(setup_of(ckpt=True, mb=1))]
    assert "gradient checkpointing" not in names
    assert not any(name.startswith("micro-batch") for name in names)


def test_offload_knob_valid_setups():
    setup = replace(setup_of(stage=3), workload=replace(setup_of().workload, micro_batch=1))
    changes = dict(knob_changes(setup))
    off = changes["optimizer and parameter offload to cpu"]
    assert (off.zero.offload_optimizer, off.zero.offload_params, off.optimizer.impl) == ("cpu", "cpu", "cpu")

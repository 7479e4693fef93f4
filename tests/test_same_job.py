"""One job, asked three ways (flags, --ds-config, plan's written config read back), gives one answer.

The job is the one that disagreed before the shared vocabulary: llama-3-70b on 8 x 8 GPUs, seq 256, ZeRO-3. With
zero.Init the init phase never holds the whole model, so the peak moves to a later phase; without it (the rule's
default for flags and for a plain ds_config) init holds the whole 16-bit model: 2 bytes x Psi.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner
from zeroest.estimator.catalog.models import load_model
from zeroest.estimator.configs.ds_write import ds_config
from zeroest.estimator.core.architecture import count_params

from zeroest.api import build_setup, predict_request
from zeroest.cli import app

MODEL = "llama-3-70b"
FLAGS = {"gpus_per_node": 8, "nodes": 8, "seq_len": 256, "activations": "closed-form"}
runner = CliRunner()


def _cli(*args: str) -> dict:
    result = runner.invoke(app, ["predict", "--model", MODEL, "--gpus", "8", "--nodes", "8", "--seq-len", "256",
                                 "--activations", "closed-form", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("zero_init", [None, True, False], ids=["rule", "zero-init", "no-zero-init"])
def test_flags_and_ds_config_agree(tmp_path, zero_init):
    shape = load_model(MODEL)
    flags = {**FLAGS} if zero_init is None else {**FLAGS, "zero_init": zero_init}
    by_flags = predict_request(shape, flags, stage=3).estimates[0]
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds_config(build_setup(shape, flags, stage=3))))
    by_file = predict_request(shape, flags, ds_config=path).estimates[0]
    assert by_file.peak_allocated_bytes == by_flags.peak_allocated_bytes
    assert by_file.peak_phase == by_flags.peak_phase
    switch = [] if zero_init is None else ["--zero-init" if zero_init else "--no-zero-init"]
    by_cli = _cli("--stage", "3", *switch)
    by_cli_file = _cli("--ds-config", str(path), *switch)
    assert by_cli["peak_allocated_bytes"] == by_cli_file["peak_allocated_bytes"] == by_flags.peak_allocated_bytes


def test_zero_init_moves_the_init_peak():
    """Without zero.Init, init holds the whole 16-bit model (2 Psi bytes) on the GPU; with it, never."""
    shape = load_model(MODEL)
    whole = predict_request(shape, {**FLAGS, "zero_init": False}, stage=3).estimates[0]
    parted = predict_request(shape, {**FLAGS, "zero_init": True}, stage=3).estimates[0]
    psi = count_params(shape)
    init_whole = next(p for p in whole.phases if p.name == "init").peak_bytes
    init_parted = next(p for p in parted.phases if p.name == "init").peak_bytes
    assert whole.peak_phase == "init" and init_whole >= 2 * psi.total
    assert parted.peak_phase != "init" and init_parted < 2 * psi.total / 8
    assert parted.peak_allocated_bytes < whole.peak_allocated_bytes


def test_hf_trainer_ds_config_means_zero_init(tmp_path):
    """A ds_config with "auto" values is the HF Trainer's, which builds a ZeRO-3 model under zero.Init."""
    shape = load_model(MODEL)
    path = tmp_path / "trainer.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                                "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 3}}))
    by_file = predict_request(shape, FLAGS, ds_config=path).estimates[0]
    assert by_file.setup.zero.zero_init
    by_file_no = predict_request(shape, {**FLAGS, "zero_init": False}, ds_config=path).estimates[0]
    assert not by_file_no.setup.zero.zero_init  # the flag wins over the rule


@pytest.mark.parametrize("zero_init", [True, False])
def test_plan_written_config_reads_back_the_same(tmp_path, zero_init):
    switch = "--zero-init" if zero_init else "--no-zero-init"
    path = tmp_path / "plan.json"
    result = runner.invoke(app, ["plan", "--model", "llama-3-8b", "--gpus", "8", "--gpu", "80GiB", "--seq-len", "1024",
                                 "--activations", "closed-form", "--stage", "3", "--no-grad-ckpt", switch, "--json",
                                 "--write-ds-config", str(path)])
    assert result.exit_code == 0, result.output
    best = json.loads(result.stdout)["candidates"][0]
    again = _cli_model("llama-3-8b", "--gpus", "8", "--seq-len", "1024", "--ds-config", str(path), switch)
    assert again["peak_allocated_bytes"] == best["peak_allocated_bytes"]
    assert again["setup"]["zero_init"] is zero_init


def _cli_model(model: str, *args: str) -> dict:
    result = runner.invoke(app, ["predict", "--model", model, "--activations", "closed-form", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)

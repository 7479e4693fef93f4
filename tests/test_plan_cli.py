"""``zeroest plan`` through typer's CliRunner: JSON answers equal the library's, files written, bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner
from zeroest.estimator.catalog.models import load_model
from zeroest.estimator.configs.flat import setup_from_dict
from zeroest.estimator.configs.read import setup_from_configs
from zeroest.estimator.core.estimate import estimate
from zeroest.estimator.units import GiB

from zeroest.cli import app

runner = CliRunner()
BASE = ["plan", "--model", "pythia-410m", "--gpus", "2", "--seq-len", "512", "--activations", "closed-form"]


def run(*args: str):
    return runner.invoke(app, [*BASE, *args])


def test_plan_json_best_fits_and_is_reestimated():
    res = run("--gpu", "8GiB", "--global-batch", "32", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["fits"] and doc["considered"] >= doc["fitting"] > 0
    best = doc["candidates"][0]
    setup = setup_from_dict(best["setup"], model=load_model("pythia-410m"))
    assert estimate(setup).device_bytes == best["device_bytes"] <= 0.9 * 8 * GiB
    w = setup.workload
    assert w.micro_batch * w.grad_accum * setup.world_size == 32


def test_plan_writes_configs_that_read_back(tmp_path):
    ds, acc = tmp_path / "ds.json", tmp_path / "acc.yaml"
    res = run(
        "--gpu",
        "8GiB",
        "--global-batch",
        "32",
        "--json",
        "--write-ds-config",
        str(ds),
        "--write-accelerate-config",
        str(acc),
    )
    assert res.exit_code == 0, res.output
    best = json.loads(res.output)["candidates"][0]["setup"]
    setup, warnings = setup_from_configs(
        None, acc, {"model": load_model("pythia-410m"), "seq_len": 512, "activations": "closed-form"}
    )
    assert not [w for w in warnings if "!=" in w or "unknown" in w]
    assert int(setup.stage) == best["stage"]
    assert (setup.workload.micro_batch, setup.workload.grad_accum) == (
        best["micro_batch"],
        best["grad_accum"],
    )
    assert (setup.zero.offload_optimizer, setup.zero.offload_params) == (
        best["offload_optimizer"],
        best["offload_params"],
    )


def test_queries_json():
    # 10 GiB: on 8 GiB pythia-410m's first step (flat fp32 buffers over the first micro-step, core.reserved) leaves
    # no micro-batch without checkpointing
    res = run(
        "--gpu", "10GiB", "--stage", "2", "--offload", "none", "--max-micro-batch", "--min-gpus", "--json"
    )
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [(r["stage"], r["grad_ckpt"]) for r in rows] == [(2, False), (2, True)]
    assert rows[1]["max_micro_batch"] >= rows[0]["max_micro_batch"] >= 1
    assert all(r["min_gpus"] is not None for r in rows)


def test_explain_flag_prints_sentences():
    res = run("--gpu", "8GiB", "--global-batch", "32", "--explain", "--top", "3")
    assert res.exit_code == 0, res.output
    assert "the peak is" in res.output and "setups considered" in res.output


def test_infeasible_exit_1_with_reason():
    res = runner.invoke(
        app,
        [
            "plan",
            "--model",
            "pythia-6.9b",
            "--gpus",
            "2",
            "--gpu",
            "4GiB",
            "--seq-len",
            "512",
            "--activations",
            "closed-form",
            "--json",
        ],
    )
    assert res.exit_code == 1
    doc = json.loads(res.output)
    assert doc["fits"] is False and "does not fit on 2 x 4 GiB" in doc["reason"]
    assert "usable with margin 10%" in doc["reason"]  # as --margin's help and every verdict write it


@pytest.mark.parametrize(
    "args,message",
    [
        (["--gpu", "8GiB", "--margin", "1.5"], "--margin"),
        (["--gpu", "8GiB", "--global-batch", "33"], "multiple of 2"),
        (["--gpu", "rtx9090"], "unknown GPU"),
        (["--gpu", "24"], "24GB"),
        (["--gpu", "8GiB", "--stage", "4"], "--stage must be 0, 1, 2 or 3"),
    ],
)
def test_bad_input_exit_2(args, message):
    res = run(*args)
    assert res.exit_code == 2
    assert message in res.output


def test_gpu_preset_4090_is_a_preset_not_bytes():
    res = run("--gpu", "4090", "--stage", "0", "--offload", "none", "--max-micro-batch", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)[0]["max_micro_batch"] > 0


def test_plan_table_states_the_margin_in_percent_and_step_times_to_three_digits():
    """The title says the margin as ``--margin`` reads it (10%, not 0.1), and every step time keeps three
    significant digits (1.00, not 1), whole seconds from 100 on (1,234, not 1.23e+03)."""
    from zeroest.cli.render_plan import seconds

    res = run("--gpu", "24GiB", "--margin", "0.15")
    assert res.exit_code == 0, res.output
    assert "margin 15%" in " ".join(res.output.split())
    assert [seconds(s) for s in (1.0, 0.65, 12.34, 99.96, 1234.5, 0.01234)] == [
        "1.00", "0.650", "12.3", "100", "1,234", "0.0123"]

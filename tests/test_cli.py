"""The CLI through typer's CliRunner: JSON that other tools read, the table, and one clear line per bad input."""

import json

import pytest
from typer.testing import CliRunner
from zeroest.estimator.catalog.models import standard_shape
from zeroest.estimator.core.estimate import estimate
from zeroest.estimator.core.setup import Parallelism, TrainingSetup, Workload, ZeroConfig

from zeroest.cli import app

runner = CliRunner()
JSON_KEYS = {"stage", "world_size", "components", "peak_allocated_bytes", "peak_reserved_bytes", "device_bytes",
             "peak_phase", "phases", "cpu_bytes_per_node", "nvme_bytes", "assumptions"}


@pytest.fixture(autouse=True)
def _wide_consoles(monkeypatch):
    """200 columns for the CLI's consoles, whichever test built them: rich fixes a console's width from COLUMNS
    where it is set when ``zeroest.cli.common`` makes them, and the table below needs more than 80 (on two
    workers a console was 80 wide, and this test failed)."""
    from zeroest.cli import common

    for console in (common.out, common.err):
        monkeypatch.setattr(console, "_width", 200)


def run(*args):
    return runner.invoke(app, list(args), env={"COLUMNS": "200"})


def test_predict_json_all_stages_matches_the_library():
    result = run("predict", "--params", "1.3B", "--gpus", "2", "--json")
    assert result.exit_code == 0, result.output
    docs = json.loads(result.stdout)
    assert [d["stage"] for d in docs] == [0, 1, 2, 3]
    for doc in docs:
        assert JSON_KEYS <= doc.keys()
        assert sum(doc["components"].values()) == doc["peak_allocated_bytes"]
        setup = TrainingSetup(model=standard_shape(1_300_000_000), parallel=Parallelism(gpus_per_node=2),
                              zero=ZeroConfig(stage=doc["stage"]), workload=Workload(activations="closed-form"))
        assert doc["peak_allocated_bytes"] == estimate(setup).peak_allocated_bytes


def test_predict_one_stage_is_one_object_and_fit_row():
    result = run("predict", "--model", "gpt2", "--stage", "2", "--gpus", "4", "--json", "--gpu", "4090",
                 "--activations", "closed-form")
    doc = json.loads(result.stdout)
    assert doc["stage"] == 2 and doc["world_size"] == 4
    assert doc["gpu"]["fits"] == (doc["device_bytes"] <= doc["gpu"]["memory_bytes"])
    assert doc["gpu"]["memory_bytes"] == 24564 * 2**20


def test_predict_table_prints_every_row():
    result = run("predict", "--params", "1.3B", "--gpus", "2", "--gpu", "24GiB")
    assert result.exit_code == 0
    for row in ("params (16-bit)", "optimizer states", "activations", "peak allocated", "peak reserved",
                "device (nvidia-smi)", "host RAM per node", "stage 3", "fits"):
        assert row in result.output


def test_paper_mode_is_figure_1():
    result = run("predict", "--params", "7.5B", "--gpus", "64", "--paper", "--json")
    totals = [d["peak_allocated_bytes"] / 1e9 for d in json.loads(result.stdout)]
    assert totals == pytest.approx([120, 31.4, 16.6, 1.9], abs=0.05)


def test_offload_params_shows_stage_3_only():
    result = run("predict", "--params", "1B", "--offload-optimizer", "cpu", "--offload-params", "cpu", "--json",
                 "--gpus", "2")
    docs = json.loads(result.stdout)
    assert [d["stage"] for d in docs] == [3]
    assert docs[0]["cpu_bytes_per_node"] > 0


@pytest.mark.parametrize("args,message", [
    (["--model", "llama-7b"], "did you mean llama-2-7b"),
    (["--params", "1.3Q"], "cannot read '1.3Q'"),
    (["--params", "1B", "--gpus", "0"], "--gpus"),
    (["--params", "1B", "--gpus", "-2"], "--gpus"),
    (["--params", "1B", "--stage", "5"], "--stage must be 0, 1, 2 or 3"),
    (["--params", "1B", "--stage", "2", "--offload-optimizer", "cpu", "--offload-params", "cpu"],
     "parameter offload needs ZeRO stage 3"),
    (["--params", "1B", "--model", "gpt2"], "exactly one of --params"),
    (["--params", "1B", "--gpu", "h1000"], "unknown GPU 'h1000'"),
    (["--params", "1B", "--optimizer", "sgd", "--optimizer-impl", "fused"], "--optimizer-impl torch"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    result = runner.invoke(app, ["predict", *args])
    assert result.exit_code == 2
    text = result.output.strip()
    assert message in text
    assert "Traceback" not in text


def test_seq_len_beyond_the_model_warns_but_predicts():
    result = run("predict", "--model", "gpt2", "--seq-len", "4096", "--stage", "0", "--activations", "closed-form",
                 "--json")
    assert result.exit_code == 0
    assert "beyond gpt2's max_position_embeddings (1024)" in result.stderr


def test_config_without_needed_fields(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "vocab_size": 100}))
    result = run("predict", "--model", str(path))
    assert result.exit_code == 2 and "hidden_size" in result.output


def test_claims_json_and_plot(tmp_path):
    plot = tmp_path / "claims.png"
    result = run("claims", "--params", "7.5B", "--json", "--plot", str(plot))
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    at2 = {r["stage"]: r for r in doc["rows"] if r["world_size"] == 2}
    assert at2[1]["paper_reduction"] == pytest.approx(1.6)
    assert any("not 4x" in v for v in doc["verdicts"])
    assert plot.stat().st_size > 10_000


def test_models_lists_presets():
    result = run("models")
    assert "llama-3-8b" in result.output.split() and "gpt2-xl" in result.output.split()



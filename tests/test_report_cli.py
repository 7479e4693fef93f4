"""``zeroest report`` end to end on synthetic runs measured with known overheads: held-out errors, calibration
files, plots, Markdown, the JSON schema, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import json

import pytest
import typer
from test_report_support import (  # noqa: F401
    H100,
    TRUE_OVERHEADS,
    closed_form,
    make_setup,
    synthetic_grid,
    synthetic_row,
    write_rows,
)
from typer.testing import CliRunner
from zeroest.estimator.core.overheads import Overheads

from zeroest.cli.report import report
from zeroest.report.fit import FITTED_FOR

# The command as zeroest/cli.py registers it, alone, so these tests do not depend on the other commands.
app = typer.Typer()
app.command("report")(report)


@app.callback()
def _group() -> None:
    """zeroest"""

pytestmark = pytest.mark.usefixtures("closed_form")

STATS_KEYS = {"n", "median_abs_error", "max_abs_error", "mean_error", "under_prediction_rate"}
SUMMARY_KEYS = {"zeroest_version", "runs", "rows", "compared_rows", "basis", "peak_allocated",
                "peak_reserved", "device", "phases", "bases", "drift", "oom", "fits", "claims", "skipped"}
CALIBRATION = "nvidia-h100-80gb-hbm3-torch2.5-ds0.16.json"


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, closed_form):  # noqa: F811
    folder = tmp_path_factory.mktemp("runs")
    rows = synthetic_grid()
    rows.append(synthetic_row(make_setup("gpt2", 3, 8), simulated=True))
    rows.append(synthetic_row(make_setup("gpt2-medium", 0, 2, micro_batch=64), oom="step0.forward0"))
    rows.append({**rows[0], "zeroest_version": "0.0.1"})
    write_rows(folder / "h100" / "runs.jsonl", rows)
    return folder


@pytest.fixture(scope="module")
def fitted(runs_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    args = ["report", str(runs_dir), "--fit", "--json", "--plots", str(out / "plots"), "--markdown",
            str(out / "ACCURACY.md"), "--write-calibration", str(out / "calibration"), "--folds", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), out


def test_json_schema_is_stable(fitted):
    summary, _ = fitted
    assert set(summary) == SUMMARY_KEYS
    for q in ("peak_allocated", "peak_reserved", "device"):
        assert set(summary[q]) == STATS_KEYS
    assert set(summary["bases"]) == {"stored", "current", "defaults", "in_sample", "held_out"}
    assert set(summary["phases"]) == {"init", "forward", "backward", "step"}
    assert summary["runs"] == 56 and summary["rows"] == 56 and summary["compared_rows"] == 55


def test_held_out_errors_vanish_when_the_overheads_are_recoverable(fitted):
    summary, _ = fitted
    assert summary["basis"] == "held_out"
    # reserved (and device, built on it) is rounded up to a 2 MiB segment, which the fit sees as half a segment
    # on average: up to 1 MiB on rows of 1.5 GiB and more
    for q, tolerance in (("peak_allocated", 1e-4), ("peak_reserved", 1e-3), ("device", 1e-3)):
        assert summary[q]["n"] == 55
        assert summary[q]["max_abs_error"] < tolerance
        # the defaults are not the truth, so the fit had something to do
        assert summary["bases"]["defaults"][q]["median_abs_error"] > 0.01


def test_calibration_file_holds_the_true_overheads(fitted):
    summary, out = fitted
    doc = json.loads((out / "calibration" / CALIBRATION).read_text())
    assert set(doc) == {"overheads", "fitted_on", "errors"}
    for quantity, names in FITTED_FOR.items():
        rel = 1e-3 if quantity == "peak_allocated" else 5e-3  # reserved rounds to a segment (see above)
        for name in names:
            if name in ("reserved_fraction_of_offload_grads", "reserved_fraction_expandable"):
                # no offload and no expandable segments on the grid: held at their defaults
                assert doc["overheads"][name] == getattr(Overheads(), name)
                continue
            assert doc["overheads"][name] == pytest.approx(getattr(TRUE_OVERHEADS, name), rel=rel), name
    assert doc["fitted_on"]["gpu"] == "NVIDIA H100 80GB HBM3"
    assert doc["fitted_on"]["models"] == ["gpt2", "gpt2-medium", "opt-125m", "pythia-160m", "pythia-410m",
                                          "qwen2.5-0.5b"]
    assert set(doc["errors"]) == {"defaults", "in_sample", "held_out", "held_out_note"}
    group = CALIBRATION.removesuffix(".json")
    assert summary["fits"][group]["cross_validated"] is True


def test_plots_are_written_and_not_empty(fitted):
    _, out = fitted
    files = sorted(p.name for p in (out / "plots").iterdir())
    stems = ("components", "error_histogram", "predicted_vs_measured", "reductions")
    assert files == sorted(f"{s}.{ext}" for s in stems for ext in ("png", "svg"))
    for name in files:
        data = (out / "plots" / name).read_bytes()
        assert len(data) > 5000
        assert data.startswith(b"\x89PNG") if name.endswith(".png") else b"<svg" in data[:2000]


def test_markdown_links_the_plots_and_lists_skipped_rows(fitted):
    _, out = fitted
    text = (out / "ACCURACY.md").read_text()
    assert "## Headline (fitted, held out by model)" in text
    assert "![predicted_vs_measured](plots/predicted_vs_measured.png)" in text
    assert "written by zeroest 0.0.1" in text
    assert "gpt2-medium z0 N=2 mb64x512 bf16 adamw/fused | step0.forward0" in text


def test_oom_and_skipped_rows_are_reported(fitted):
    from zeroest.estimator.core.estimate import estimate

    summary, _ = fitted
    # the OOM row (gpt2-medium, stage 0, micro-batch 64): did the estimate (defaults) say it would not fit?
    seen = estimate(make_setup("gpt2-medium", 0, 2, micro_batch=64)).device_bytes > H100["memory_bytes"]
    assert summary["oom"] == {"runs": 1, "predicted": int(seen), "missed": int(not seen), "false_alarms": 0}
    assert [s["reason"] for s in summary["skipped"]] == [
        "written by zeroest 0.0.1, this is zeroest 0.1.0: the estimate may have changed since; measure again "
        "with this version"]


def test_measured_claims_sit_beside_the_predictions(fitted):
    summary, _ = fitted
    claims = {(c["model"], c["world_size"], c["stage"]): c for c in summary["claims"]}
    assert ("gpt2", 4, 3) in claims and all(stage > 0 for _, _, stage in claims)
    # ZeRO paper, Figure 1: P_os+g holds 2 Psi + (2 + K) Psi / N_d of the baseline's (2 + 2 + K) Psi, K = 12
    assert claims[("gpt2", 4, 2)]["paper"] == pytest.approx(16 / (2 + 14 / 4))
    assert claims[("gpt2", 4, 3)]["paper"] == pytest.approx(4.0)
    for c in claims.values():
        assert c["measured"] == pytest.approx(c["predicted"], rel=0.2)


def test_one_model_gets_in_sample_errors_and_says_why(tmp_path):
    rows = synthetic_grid(models=("gpt2",))
    write_rows(tmp_path / "runs.jsonl", rows)
    result = CliRunner().invoke(app, ["report", str(tmp_path), "--fit", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["basis"] == "in_sample"
    fit = next(iter(summary["fits"].values()))
    assert fit["cross_validated"] is False and "only one model" in fit["cv_note"]


def _one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zeroest: error: "), result.stderr
    return lines[0]


def test_bad_input_exits_2_with_one_line(tmp_path):
    assert "does not exist" in _one_line_error(["report", str(tmp_path / "missing")])
    assert "no .jsonl files" in _one_line_error(["report", str(tmp_path)])
    path = write_rows(tmp_path / "runs.jsonl", [{**synthetic_row(make_setup("gpt2", 0, 1)), "status": "error"}])
    assert "no usable runs" in _one_line_error(["report", str(tmp_path)])
    assert "--folds" in _one_line_error(["report", str(tmp_path), "--folds", "1"])
    assert "needs --fit" in _one_line_error(["report", str(tmp_path), "--write-calibration", str(tmp_path / "c")])
    assert "--pool needs --fit" in _one_line_error(["report", str(tmp_path), "--pool"])
    assert "drop --write-calibration" in _one_line_error(["report", str(tmp_path), "--fit", "--pool",
                                                          "--write-calibration", str(tmp_path / "c")])
    with open(path, "a") as handle:
        handle.write('{"zeroest_version": "0.1.0", "run_key"\n')
    assert f"{path}:2: not valid JSON" in _one_line_error(["report", str(tmp_path)])


def test_a_setup_the_estimator_cannot_rebuild_is_skipped_with_the_reason(tmp_path):
    good = synthetic_row(make_setup("gpt2", 0, 1))
    bad = {**good, "run_key": "another-run", "setup": {**good["setup"], "model": "gpt-nonexistent"}}
    write_rows(tmp_path / "runs.jsonl", [good, bad])
    result = CliRunner().invoke(app, ["report", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["rows"] == 1 and summary["basis"] == "current"
    assert "cannot rebuild its setup: unknown model 'gpt-nonexistent'" in summary["skipped"][0]["reason"]


def _outputs(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _write_twice(tmp_path, *options: str) -> list[dict[str, bytes]]:
    """Run the same report twice into tmp_path/out; what it wrote each time."""
    runs_dir = tmp_path / "runs"
    write_rows(runs_dir / "h100" / "runs.jsonl", synthetic_grid(models=("gpt2", "opt-125m"), worlds=(1, 4)))
    out = tmp_path / "out"
    args = ["report", str(runs_dir), "--fit", "--folds", "2", *(o.format(out=out) for o in options)]
    written = []
    for _ in range(2):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        written.append(_outputs(out))
    return written


def test_calibration_and_markdown_are_the_same_bytes_every_time(tmp_path):
    first, second = _write_twice(tmp_path, "--write-calibration", "{out}/cal.json", "--markdown",
                                 "{out}/ACCURACY.md")
    assert set(first) == {"cal.json", "ACCURACY.md"}
    assert first == second
    text = first["cal.json"].decode()
    doc = json.loads(text)
    assert text == json.dumps(doc, sort_keys=True, indent=1) + "\n"  # keys sorted, nothing but the document
    assert str(tmp_path) not in text  # runs files named without machine paths
    assert doc["fitted_on"]["files"] == ["h100/runs.jsonl"]


@pytest.mark.slow
def test_plots_are_the_same_bytes_every_time(tmp_path):
    first, second = _write_twice(tmp_path, "--plots", "{out}/plots")
    assert len(first) == 8 and first == second


def test_a_json_path_for_several_gpu_groups_is_refused(tmp_path):
    a100 = {"name": "NVIDIA A100-SXM4-80GB", "memory_bytes": 80 * 2**30}
    rows = synthetic_grid(models=("gpt2", "opt-125m")) + synthetic_grid(models=("gpt2", "opt-125m"), gpu=a100)
    write_rows(tmp_path / "runs.jsonl", rows)
    target = tmp_path / "cal" / "one.json"
    message = _one_line_error(["report", str(tmp_path), "--fit", "--write-calibration", str(target)])
    assert "2 GPU groups were fitted" in message and "pass a folder" in message
    assert not (tmp_path / "cal").exists()


def test_pool_fits_every_gpu_group_as_one_cross_validated_by_model(tmp_path):
    from zeroest.report.analysis import POOLED_PREFIX, analyze

    a100 = {"name": "NVIDIA A100-SXM4-80GB", "memory_bytes": 80 * 2**30}
    rows = synthetic_grid(models=("gpt2", "opt-125m")) + synthetic_grid(models=("pythia-160m",), gpu=a100)
    write_rows(tmp_path / "runs.jsonl", rows)
    a = analyze([tmp_path], fit=True, pool=True)
    (fit,) = a.fits
    assert fit.group.startswith(POOLED_PREFIX) and fit.rows == len(a.records)
    assert fit.models == ("gpt2", "opt-125m", "pythia-160m")
    # every row has a held-out prediction from a fold that never saw its model, whatever its GPU
    assert set(a.predictions["held_out"]) == {r.key for r in a.records}
    for models, _ in fit.cv.folds:
        assert len(models) == 1


def _tree(folder) -> dict[str, str]:
    import hashlib

    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def test_a_report_with_fit_changes_no_file_of_the_repository(tmp_path, monkeypatch):
    """``--fit`` alone writes nothing: neither the runs it reads (a copy of the repository's data) nor the
    checkout's data/calibration, which --fit once overwrote."""
    import shutil
    from pathlib import Path

    import zeroest

    repo_data = Path(zeroest.__file__).resolve().parents[1] / "data"
    if not (repo_data / "runs" / "h100-default" / "runs.jsonl").is_file():
        pytest.skip("not a checkout with data/runs")
    copy = tmp_path / "data"
    shutil.copytree(repo_data, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before_copy, before_repo = _tree(copy), _tree(repo_data)
    monkeypatch.chdir(tmp_path)
    runs = [str(copy / "runs" / name) for name in ("h100-default", "h100-holdout", "h100-launchers")]
    result = CliRunner().invoke(app, ["report", *runs, "--fit"])
    assert result.exit_code == 0, result.output
    assert "64 runs, 64 ranks" in result.stdout and "wrote" not in result.stdout
    assert _tree(copy) == before_copy
    assert _tree(repo_data) == before_repo
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_a_calibration_held_against_rows_predicts_every_row_with_it(runs_dir, tmp_path):
    # the synthetic rows were measured with TRUE_OVERHEADS: held against them, that file leaves no error, while
    # each group's own prediction (the defaults: no file for this group) does
    path = tmp_path / "truth.json"
    path.write_text(json.dumps({"overheads": {k: v for k, v in TRUE_OVERHEADS.to_dict().items() if k != "source"}}))
    held = json.loads(CliRunner().invoke(app, ["report", str(runs_dir), "--calibration", str(path), "--json"]).stdout)
    plain = json.loads(CliRunner().invoke(app, ["report", str(runs_dir), "--json"]).stdout)
    for q in ("peak_allocated", "peak_reserved", "device"):
        assert held["basis"] == "current" and held[q]["max_abs_error"] < 1e-4
        assert plain[q]["median_abs_error"] > 0.01
    assert "calibration" in _one_line_error(["report", str(runs_dir), "--calibration", str(tmp_path / "no.json")])

"""Usable rows of runs files (the rest skipped with why), measured reductions, phase mapping, calibration lookup."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from test_report_support import (  # noqa: F401
    TRUE_OVERHEADS,
    VERSIONS,
    closed_form,
    make_setup,
    synthetic_row,
    write_rows,
)
from zeroest.estimator.catalog.calibration import calibration_name, find_calibration, gpu_slug, short_version

from zeroest.report.join import measured_phase_peaks
from zeroest.report.load import load_runs, measured_reductions
from zeroest.report.runs import RunsFileError, runs_files

pytestmark = pytest.mark.usefixtures("closed_form")


def test_load_runs_keeps_good_rows_and_lists_the_rest(tmp_path):
    good = synthetic_row(make_setup("gpt2", 2, 2))
    oom = synthetic_row(make_setup("gpt2", 0, 2, micro_batch=64), oom="step0.forward0")
    failed = {**good, "status": "error", "error": "RuntimeError: NCCL timeout\nmore"}
    lines = [json.dumps(good), json.dumps({**good, "zeroest_version": "0.0.9"}), json.dumps(failed), "",
             json.dumps(oom)]
    path = tmp_path / "runs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    loaded = load_runs([tmp_path], version="0.1.0")
    assert [r.line for r in loaded.rows] == [1, 5]
    reasons = {s.where: s.reason for s in loaded.skipped}
    assert set(reasons) == {f"{path}:2", f"{path}:3"}
    assert "zeroest 0.0.9" in reasons[f"{path}:2"]
    assert reasons[f"{path}:3"] == "run status error: RuntimeError: NCCL timeout"


def test_a_run_measured_again_supersedes_the_older_row(tmp_path):
    row = synthetic_row(make_setup("gpt2", 2, 2))
    old = {**row, "finished_at": "2026-12-02T15:32:30+0000",
           "measured": {**row["measured"], "peak_allocated_bytes": 1}}
    again = {**row, "finished_at": "2026-12-02T18:45:28+0000"}
    other_gpu = {**row, "finished_at": "2026-12-01T10:00:00+0000", "gpu": {**row["gpu"], "name": "NVIDIA H100"}}
    write_rows(tmp_path / "first" / "runs.jsonl", [old, other_gpu])
    write_rows(tmp_path / "second" / "runs.jsonl", [again])
    loaded = load_runs([tmp_path])
    kept = {(r.source.parent.name, r.line) for r in loaded.rows}
    assert kept == {("first", 2), ("second", 1)}                 # the H100 row is another measurement
    (skipped,) = loaded.skipped
    assert skipped.where.endswith("first/runs.jsonl:1")
    assert skipped.reason.startswith("superseded by ") and skipped.reason.endswith(
        "second/runs.jsonl:1, the same run measured again at 2026-12-02T18:45:28+0000")



def test_a_row_written_before_a_key_is_the_same_run_as_a_new_row_that_names_its_value(tmp_path):
    """The run key a row stores hashes the setup keys of its day: an old row lacking ``loop``, ``param_groups``
    and ``max_reuse_distance`` (then the Trainer's loop, one group, DeepSpeed's default distance) and a new row
    naming those values are one run, and the newer supersedes; a new row with the custom loop is another run.
    An inline model is known by its config, not by the path validate wrote it to."""
    from zeroest.estimator.catalog.models import load_config

    config = load_config("gpt2")[1]
    new = synthetic_row(make_setup("gpt2", 2, 2))
    new["setup"].update(loop="trainer", param_groups=1, max_reuse_distance=1_000_000_000)
    old_setup = {k: v for k, v in new["setup"].items() if k not in ("loop", "param_groups", "max_reuse_distance")}
    for folder in ("old", "new", "custom"):
        (tmp_path / folder / "models").mkdir(parents=True)
        (tmp_path / folder / "models" / "tiny.json").write_text(json.dumps(config))
    old = {**new, "run_key": "old-key", "finished_at": "2026-12-01T10:00:00+0000",
           "setup": {**old_setup, "model": "/elsewhere/out/models/tiny.json"}}
    again = {**new, "run_key": "new-key", "finished_at": "2026-12-03T10:00:00+0000",
             "setup": {**new["setup"], "model": "/tmp/out/models/tiny.json"}}
    custom = {**again, "run_key": "custom-key", "setup": {**again["setup"], "loop": "custom"}}
    write_rows(tmp_path / "old" / "runs.jsonl", [old])
    write_rows(tmp_path / "new" / "runs.jsonl", [again])
    write_rows(tmp_path / "custom" / "runs.jsonl", [custom])
    loaded = load_runs([tmp_path])
    assert {r.source.parent.name for r in loaded.rows} == {"new", "custom"}
    (skipped,) = loaded.skipped
    assert skipped.where.endswith("old/runs.jsonl:1") and "new/runs.jsonl:1" in skipped.reason

def test_load_runs_stops_at_a_malformed_line(tmp_path):
    good = synthetic_row(make_setup("gpt2", 2, 2))
    write_rows(tmp_path / "a" / "runs.jsonl", [good])
    (tmp_path / "b.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({"setup": {}}) + "\n")
    with pytest.raises(RunsFileError, match=r"b\.jsonl:2: not a runs\.jsonl row: no zeroest_version"):
        load_runs([tmp_path])


def test_runs_files_finds_nested_files_and_refuses_missing_paths(tmp_path):
    write_rows(tmp_path / "a" / "runs.jsonl", [])
    write_rows(tmp_path / "b" / "c" / "runs.jsonl", [])
    assert len(runs_files([tmp_path])) == 2
    with pytest.raises(ValueError, match="does not exist"):
        runs_files([tmp_path / "nowhere"])


def test_measured_reductions_are_stage0_peak_over_stage_peak(tmp_path):
    rows = [synthetic_row(make_setup("gpt2", stage, world)) for world in (2, 4) for stage in (0, 1, 2, 3)]
    write_rows(tmp_path / "runs.jsonl", rows)
    peak = {(r["setup"]["stage"], r["setup"]["world_size"]): r["measured"]["peak_allocated_bytes"]
            for r in rows}
    got = measured_reductions(tmp_path)
    assert set(got) == {f"{s}@{n}" for s in (0, 1, 2, 3) for n in (2, 4)}
    for (stage, world), value in peak.items():
        assert got[f"{stage}@{world}"] == pytest.approx(peak[(0, world)] / value)


def test_measured_reductions_prefer_real_runs_and_skip_ooms(tmp_path):
    base = synthetic_row(make_setup("gpt2", 0, 8))
    real = synthetic_row(make_setup("gpt2", 3, 8))
    sim = synthetic_row(make_setup("gpt2", 3, 8), simulated=True)
    sim["measured"]["peak_allocated_bytes"] //= 2
    crashed = synthetic_row(make_setup("gpt2", 2, 8), oom="step0.backward0")
    write_rows(tmp_path / "runs.jsonl", [base, sim, real, crashed])
    got = measured_reductions(tmp_path / "runs.jsonl")
    assert got == {"0@8": pytest.approx(1.0),
                   "3@8": pytest.approx(base["measured"]["peak_allocated_bytes"]
                                        / real["measured"]["peak_allocated_bytes"])}


def test_measured_reductions_of_an_empty_file_is_an_error(tmp_path):
    (tmp_path / "runs.jsonl").write_text("")
    with pytest.raises(ValueError, match="no usable runs"):
        measured_reductions(tmp_path)


def test_phase_names_map_to_predicted_phases():
    phases = {"build": {"peak_allocated_bytes": 900}, "init": {"peak_allocated_bytes": 10},
              "step0.forward0": {"peak_allocated_bytes": 20}, "step1.forward1": {"peak_allocated_bytes": 25},
              "step0.backward0": {"peak_allocated_bytes": 40}, "step2.step": {"peak_allocated_bytes": 30},
              "step1.step": {"peak_allocated_bytes": None}}
    assert measured_phase_peaks(phases) == {"init": 10, "forward": 25, "backward": 40, "step": 30}


@pytest.mark.parametrize(("name", "slug"), [("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
                                            ("NVIDIA A100-SXM4-40GB", "nvidia-a100-sxm4-40gb")])
def test_gpu_slug(name, slug):
    assert gpu_slug(name) == slug


def test_versions_are_cut_to_major_minor():
    assert short_version("2.5.1+cu124") == "2.5"
    assert short_version("0.16.3") == "0.16"
    assert short_version(None) == "unknown"
    name = calibration_name("NVIDIA H100 80GB HBM3", "2.5.1", "0.16.3")
    assert name == "nvidia-h100-80gb-hbm3-torch2.5-ds0.16.json"


def test_find_calibration_reads_back_a_written_file(tmp_path):
    values = {k: v for k, v in replace(TRUE_OVERHEADS).to_dict().items() if k != "source"}
    name = calibration_name("NVIDIA H100 80GB HBM3", VERSIONS["torch"], VERSIONS["deepspeed"])
    (tmp_path / name).write_text(json.dumps({"overheads": values, "fitted_on": {}, "errors": {}}))
    found = find_calibration("NVIDIA H100 80GB HBM3", "2.5.0", "0.16.9", directory=tmp_path)
    assert found is not None
    assert found.cuda_context_bytes == TRUE_OVERHEADS.cuda_context_bytes
    assert found.activation_scale == pytest.approx(TRUE_OVERHEADS.activation_scale)
    assert found.source == name
    assert find_calibration("NVIDIA H100 80GB HBM3", "2.6.0", "0.16.3", directory=tmp_path) is None


def test_each_40_step_row_of_data_runs_supersedes_the_3_step_row_of_its_setup():
    """data/grids/long.yaml runs eight measured setups again; each of its rows in data/runs/h200-long is the same
    run as exactly one older row elsewhere in data/runs, which the report then skips."""
    from pathlib import Path

    runs = Path(__file__).resolve().parents[1] / "data" / "runs"
    loaded = load_runs([runs])
    by = {}
    for s in loaded.skipped:
        if "/h200-long/" in s.reason:
            by.setdefault(s.reason.split("superseded by ")[1].split(",")[0], []).append(s.where)
    assert len(by) == 8 and all(len(older) == 1 for older in by.values())
    assert {Path(w[0]).parent.name for w in by.values()} == {"h200-families", "h200-neighbours", "h200-cards",
                                                             "h200-users2"}

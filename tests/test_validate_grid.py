"""validate's grids, results file, summary table and GPU packing: plain data, no DeepSpeed run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from zeroest.estimator.units import GiB
from zeroest.validate.grid import apply_overrides, load_grid, parse_grid, parse_override
from zeroest.validate.jobs import GPU_USABLE_FRACTION, PACKING_MARGIN, PACKING_SLACK_BYTES, Job, Run, Slots
from zeroest.validate.summary import markdown, run_label, summary_rows

from zeroest.report.runs import append_rows, check_version, done_keys, drop_runs, make_rows, read_rows

GRID = """\
models:
  tiny: {model_type: gpt2, n_layer: 1, n_embd: 32, n_head: 2, vocab_size: 128}
defaults: {model: tiny, micro_batch: 2}
runs:
  - {stage: 0}
  - {stage: 3, world_size: 4, simulate: true}
"""


def test_parse_grid_merges_defaults():
    grid = parse_grid(GRID, "g.yaml")
    assert [e.setup for e in grid.entries] == [
        {"model": "tiny", "micro_batch": 2, "stage": 0},
        {"model": "tiny", "micro_batch": 2, "stage": 3, "world_size": 4},
    ]
    assert [e.simulate for e in grid.entries] == [False, True]
    assert [e.where for e in grid.entries] == ["g.yaml:5", "g.yaml:6"]
    assert grid.models["tiny"]["n_embd"] == 32


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GRID.replace("{stage: 3,", "{stag: 3,"), r"g.yaml:6: unknown key 'stag'; did you mean 'stage'\?"),
        (
            GRID.replace("defaults: {model: tiny,", "defaults: {modle: tiny,"),
            r"g.yaml:3: unknown key 'modle'",
        ),
        (GRID.replace("runs:", "run:"), r"g.yaml:4: unknown key 'run'; did you mean 'runs'\?"),
        ("- {stage: 0}\n- {stage: 1, micro_bach: 2}\n", r"g.yaml:2: unknown key 'micro_bach'"),
        ("runs: [\n", r"g.yaml:\d+: not valid YAML/JSON"),
        ("", "the grid is empty"),
    ],
)
def test_bad_grids_name_line_and_key(text, message):
    with pytest.raises(ValueError, match=message):
        parse_grid(text, "g.yaml")


def test_json_grid_has_line_numbers(tmp_path):
    path = tmp_path / "g.json"
    path.write_text(json.dumps([{"model": "gpt2", "stage": 1}, {"model": "gpt2", "sage": 2}], indent=1))
    with pytest.raises(ValueError, match=rf"{path}:\d+: unknown key 'sage'"):
        load_grid(str(path))


def test_overrides_and_simulated_copies():
    grid = parse_grid(GRID, "g.yaml")
    entries = apply_overrides(grid, ["micro_batch=8", "seq-len=512"], [2, 8])
    assert len(entries) == 2 + 2 * 2
    assert all(e.setup["micro_batch"] == 8 and e.setup["seq_len"] == 512 for e in entries)
    copies = entries[2:]
    assert [(e.setup["world_size"], e.simulate) for e in copies] == [
        (2, True),
        (2, True),
        (8, True),
        (8, True),
    ]
    assert parse_override("grad_ckpt=true") == ("grad_ckpt", True)
    with pytest.raises(ValueError, match="did you mean 'micro_batch'"):
        parse_override("micro_btch=2")
    with pytest.raises(ValueError, match="expected key=value"):
        parse_override("stage")


def test_quick_grid_is_small_and_mixes_real_and_simulated():
    grid = load_grid("quick")
    assert 2 <= len(grid.entries) <= 4
    assert any(e.simulate for e in grid.entries) and any(not e.simulate for e in grid.entries)
    assert all(e.setup["model"] in grid.models for e in grid.entries)


def test_default_grid_covers_what_it_promises():
    grid = load_grid("default")
    setups = [
        {"grad_accum": 1, "grad_ckpt": False, "dtype": "bf16", "optimizer_impl": "fused", **e.setup}
        for e in grid.entries
    ]
    assert len(setups) >= 40
    families = {s["model"].split("-")[0].replace("qwen2.5", "qwen").rstrip("0123456789.m") for s in setups}
    assert len(families) >= 3
    assert {s["stage"] for s in setups} == {0, 1, 2, 3}
    simulated = {s["world_size"] for s, e in zip(setups, grid.entries, strict=True) if e.simulate}
    assert simulated == {2, 4, 8}
    assert all("world_size" not in s for s, e in zip(setups, grid.entries, strict=True) if not e.simulate)
    assert min(s["micro_batch"] for s in setups) == 1 and max(s["micro_batch"] for s in setups) == 16
    assert min(s["seq_len"] for s in setups) == 512 and max(s["seq_len"] for s in setups) == 4096
    assert {s["grad_ckpt"] for s in setups} == {True, False}
    assert {s["dtype"] for s in setups} == {"bf16", "fp16"}
    assert {"fused", "torch", "cpu"} <= {s["optimizer_impl"] for s in setups}
    assert {s["grad_accum"] for s in setups} == {1, 4}
    assert {s["stage"] for s in setups if s.get("offload_optimizer") == "cpu"} == {2, 3}
    assert {s["stage"] for s in setups if s.get("offload_params") == "cpu"} == {3}


def _rows(key, n_ranks, version="0.1.0", **measured):
    setup = {
        "model": "gpt2",
        "stage": 0,
        "world_size": n_ranks,
        "micro_batch": 1,
        "seq_len": 8,
        "dtype": "bf16",
        "optimizer": "adamw",
        "optimizer_impl": "fused",
        "grad_accum": 1,
        "grad_ckpt": False,
    }
    ranks = [{"complete": True, "measured": {"phases": {}, "oom": None, **measured}}] * n_ranks
    return make_rows(
        run_key=key,
        launcher="torchrun",
        setup=setup,
        simulated=False,
        ranks=ranks,
        prediction=None,
        prediction_error="x",
        exclusive=True,
        wall_s=1.0,
        failure=None,
        version=version,
    )


def test_results_file_resume_keys(tmp_path):
    path = tmp_path / "runs.jsonl"
    append_rows(path, _rows("a", 2))
    append_rows(path, _rows("b", 2)[:1])  # validate killed after one rank's row of run b
    rows = read_rows(path)
    assert [r["run_key"] for r in rows] == ["a", "a", "b"]
    assert done_keys(rows) == {"a"}
    assert drop_runs(path, {"a"}) == 2
    assert [r["run_key"] for r in read_rows(path)] == ["b"]
    assert (tmp_path / "runs.jsonl.bak").is_file()


def test_other_versions_are_refused(tmp_path):
    rows = _rows("a", 1, version="0.0.9")
    with pytest.raises(ValueError, match=r"zeroest 0\.0\.9, and this is zeroest 0\.1\.0.*new --out"):
        check_version(rows, "0.1.0", tmp_path / "runs.jsonl")
    check_version(_rows("a", 1), "0.1.0", tmp_path / "runs.jsonl")


def test_row_status_from_rank_results():
    setup = _rows("a", 1)[0]["setup"]
    common = dict(
        run_key="k",
        launcher="torchrun",
        setup={**setup, "world_size": 2},
        simulated=False,
        prediction=None,
        prediction_error=None,
        exclusive=True,
        wall_s=3.0,
        version="0.1.0",
    )
    oom = {
        "complete": False,
        "error": "OutOfMemoryError",
        "measured": {"phases": {}, "oom": "step0.backward0"},
    }
    rows = make_rows(ranks=[oom, None], failure="exit code 3", **common)
    assert [r["status"] for r in rows] == ["oom", "crashed"]
    assert [r["rank"] for r in rows] == [0, 1] and all(r["ranks_in_run"] == 2 for r in rows)
    rows = make_rows(
        ranks=[{"complete": False, "measured": {"phases": {}, "oom": None}}, None],
        failure="timeout after 60 s",
        **common,
    )
    assert [r["status"] for r in rows] == ["timeout", "timeout"]


def test_summary_error_and_speedup():
    base = _rows("z0", 1, peak_allocated_bytes=10 * GiB, tokens_per_s=1000.0)
    z2 = _rows("z2", 1, peak_allocated_bytes=8 * GiB, tokens_per_s=1250.0)
    z2[0]["setup"] = {**z2[0]["setup"], "stage": 2}
    z2[0]["prediction"] = {"peak_allocated_bytes": 9 * GiB}
    lines = summary_rows(base + z2)
    assert lines[0].speedup == pytest.approx(1.0)
    assert lines[1].speedup == pytest.approx(1250.0 / 1000.0)
    assert lines[1].error_pct == pytest.approx(100.0 * (9 - 8) / 8)
    assert lines[0].error_pct is None
    oom = _rows("oom", 1, peak_allocated_bytes=70 * GiB, oom="step0.forward0")
    oom[0]["prediction"] = {"peak_allocated_bytes": 300 * GiB}
    oom[0]["status"] = "oom"
    (line,) = summary_rows(oom)
    assert line.status == "oom@step0.forward0" and line.error_pct is None
    text = markdown(lines)
    assert text.count("\n| gpt2 z") == 2
    assert run_label(z2[0]["setup"], True) == "gpt2 z2 N=1(sim) mb1x8 bf16 adamw/fused"


@pytest.mark.parametrize(("stage", "zero_init", "tagged"), [(3, True, True), (3, False, False), (2, True, False)])
def test_run_label_tells_a_zero_init_build(stage, zero_init, tagged):
    setup = {**_rows("z", 1)[0]["setup"], "stage": stage, "zero_init": zero_init}
    assert run_label(setup, True).endswith(" zinit") is tagged


@pytest.mark.parametrize(("expandable", "tagged"), [(True, True), (False, False), (None, False)])
def test_run_label_tells_expandable_segments(expandable, tagged):
    setup = {**_rows("z", 1)[0]["setup"], "expandable_segments": expandable}
    assert run_label(setup, True).endswith(" xseg") is tagged


def _run(key, nproc=1, device_bytes=None, simulated=False):
    setup = {"gpus_per_node": nproc}
    prediction = {"device_bytes": device_bytes} if device_bytes else None
    return Run(
        key=key,
        setup=setup,
        simulated=simulated,
        launcher="torchrun",
        spec={},
        prediction=prediction,
        prediction_error=None,
    )


def _job(run, gpus, alone):
    return Job(run=run, proc=None, run_dir=None, gpus=gpus, alone=alone)


def test_packing_by_predicted_memory():
    capacity = 80 * GiB
    slots = Slots(capacity_bytes=[capacity], jobs=4)
    size = 20 * GiB
    need = int(size * PACKING_MARGIN) + PACKING_SLACK_BYTES
    fits = int(capacity * GPU_USABLE_FRACTION) // need
    placed = 0
    while (place := slots.place(_run(f"r{placed}", device_bytes=size))) is not None:
        assert place == ([0], False)
        slots.add(_job(_run(f"r{placed}", device_bytes=size), *place))
        placed += 1
    assert placed == min(fits, 4)
    assert all(job.shared for job in slots.running) is (placed > 1)


def test_unpredicted_and_multi_gpu_runs_go_alone():
    slots = Slots(capacity_bytes=[80 * GiB, 80 * GiB], jobs=4)
    assert slots.place(_run("a")) == ([0], True)
    slots.add(_job(_run("a"), [0], True))
    assert slots.place(_run("b", device_bytes=GiB)) == ([1], False)
    assert slots.place(_run("c", nproc=2, device_bytes=GiB)) is None  # GPU 0 is taken
    slots.running.clear()
    assert slots.place(_run("c", nproc=2, device_bytes=GiB)) == ([0, 1], True)


def test_one_job_at_a_time_is_exclusive():
    slots = Slots(capacity_bytes=[80 * GiB], jobs=1)
    assert slots.place(_run("a", device_bytes=GiB)) == ([0], True)
    slots.add(_job(_run("a", device_bytes=GiB), [0], True))
    assert slots.place(_run("b", device_bytes=GiB)) is None
    assert not slots.running[0].shared


def test_simulate_may_be_a_default():
    text = GRID.replace("defaults: {model: tiny,", "defaults: {simulate: true, model: tiny,").replace(
        "- {stage: 0}", "- {stage: 0, simulate: false}"
    )
    grid = parse_grid(text, "g.yaml")
    assert [e.simulate for e in grid.entries] == [False, True]
    assert all("simulate" not in e.setup for e in grid.entries)


def test_zeroinit_grid_builds_stage_3_under_zero_init_with_controls():
    from zeroest.estimator.configs.flat import setup_from_dict
    from zeroest.estimator.core.architecture import count_params

    grid = load_grid("zeroinit")
    setups = [setup_from_dict(e.setup, where=e.where) for e in grid.entries]
    assert all(e.simulate for e in grid.entries)
    assert all(int(s.stage) == 3 and s.dtype == "bf16" for s in setups)
    assert all(8 <= s.world_size <= 64 for s in setups)
    assert all(1e9 <= count_params(s.model).total <= 8.1e9 for s in setups)
    zero_init = {(s.model.name, s.world_size) for s in setups if s.zero.zero_init}
    controls = {(s.model.name, s.world_size) for s in setups if not s.zero.zero_init}
    assert len(zero_init) >= 6 and len(controls) >= 2
    assert controls <= zero_init  # each control is the same setup as a zero_init row, built whole
    assert len({s.model.name for s in setups}) >= 4 and len({s.world_size for s in setups}) >= 3


def test_a_qlora_entry_is_refused_not_run_in_16_bits(tmp_path):
    """The worker builds the base from its config in 16 bits; a base_quant entry would measure something other
    than what it predicts, so plan refuses it in one line naming the entry."""
    from pathlib import Path

    from zeroest.validate.runner import ValidateOptions, plan

    grid = parse_grid("defaults: {simulate: true, world_size: 2}\nruns:\n"
                      "  - {model: tinyllama-1.1b, stage: 2, lora_rank: 8, base_quant: nf4}\n", "qlora.yaml")
    with pytest.raises(ValueError, match=r"qlora\.yaml:3: base_quant nf4 \(QLoRA\) cannot be validated"):
        plan(apply_overrides(grid, [], []), grid.models, ValidateOptions(out=Path(tmp_path)), visible_gpus=1)


GRIDS = sorted((Path(__file__).parent.parent / "data" / "grids").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("grid", GRIDS, ids=[g.stem for g in GRIDS])
def test_every_committed_grid_still_builds_its_setups(grid, tmp_path):
    """Each grid under data/grids (the record of what every device session ran) still parses, and every entry
    builds the setup ``validate`` would run, inline models included: a key renamed or a check added later shows
    here, not on the next GPU machine."""
    from zeroest.estimator.configs.flat import setup_from_dict
    from zeroest.validate.runner import _model_config

    loaded = load_grid(str(grid))
    entries = apply_overrides(loaded, [], [])
    assert entries
    for entry in entries:
        data = dict(entry.setup)
        data["model"], _ = _model_config(str(data["model"]), loaded.models, tmp_path)
        setup = setup_from_dict(data, where=entry.where)
        assert setup.world_size >= 1 and setup.model.num_layers >= 1

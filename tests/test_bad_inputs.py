"""Bad and edge inputs a new user tries: each gets one error line (what, where, how to fix) and a non-zero exit,
or is accepted with a warning that names what was ignored or assumed; never a traceback, never a hang."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from zeroest.cli import app

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, list(args))


def _error(result, *words: str) -> str:
    """The one error line: exit code 2, no traceback, naming each of ``words``."""
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("zeroest: error:")]
    assert len(lines) == 1, result.output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _ds(tmp_path, config: dict, name: str = "ds.json"):
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return str(path)


# Tracebacks and hangs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["1e400", "1e30"])
def test_huge_params_is_an_error_not_a_traceback_or_hang(size):
    _error(_run("predict", "--params", size, "--stage", "3"), "--params", size)


def test_plan_write_into_missing_folder_is_refused_before_the_search():
    _error(_run("plan", "--gpu", "h100", "--params", "125M", "--stage", "3", "--write-ds-config",
                "/nonexistent/dir/x.json"), "--write-ds-config", "/nonexistent/dir", "does not exist")


def test_validate_out_pointing_at_a_file(tmp_path):
    target = tmp_path / "runs.txt"
    target.write_text("x")
    _error(_run("validate", "--cpu", "--grid", "quick", "--out", str(target)), "--out", str(target), "folder")


def test_claims_plot_without_matplotlib(monkeypatch, tmp_path):
    import zeroest.cli.render_claims as render

    def missing(*args, **kwargs):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(render, "write_claims_plot", missing)
    _error(_run("claims", "--plot", str(tmp_path / "c.png")), "--plot", "matplotlib", "pip install")


# Found by the 2026-12-02 sweep: one class per test --------------------------------------------------------------


@pytest.mark.parametrize(("args", "word"), [
    (("predict", "--params", "1.3B", "--stage", "abc"), "'abc' is not a valid integer"),
    (("predict", "--params", "1.3B", "--dtype", "fp8"), "bf16, fp16, fp32"),
    (("plan", "--params", "1.3B"), "Missing option '--gpu'"),
    (("models", "x"), "unexpected extra argument"),
    (("predikt",), "Did you mean 'predict'"),
])
def test_usage_errors_are_one_line(args, word):
    _error(_run(*args), word)


@pytest.mark.parametrize(("args", "words"), [
    (("--nodes", "0"), ("nodes", "--nodes")),  # ZeroDivisionError before
    (("--gpus", str(10**9)), ("100,000", "--gpus")),  # hung walking 1e9 ranks
    (("--micro-batch", str(10**13)), ("tokens per micro-batch", "--micro-batch")),
    (("--lora-rank", str(10**15)), ("parameters as trained", "--lora-rank")),  # MemoryError before
])
def test_huge_or_zero_sizes_are_refused(args, words):
    _error(_run("predict", "--params", "1.3B", *args), *words)


@pytest.mark.parametrize(("config", "key"), [
    ({"zero_optimization": [3]}, "zero_optimization must be a JSON object"),
    ({"optimizer": {"type": "AdamW", "params": [1]}}, "optimizer.params must be a JSON object"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": "cpu"}}, "offload_optimizer must be a JSON object"),
    ({"bf16": True}, "bf16 must be a JSON object"),
    ({"zero_optimization": {"stage": 2, "overlap_comm": "maybe"}}, "overlap_comm must be true or false"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": -5}}, "reduce_bucket_size must be 0 or more"),
    ({"train_micro_batch_size_per_gpu": float("inf")}, "not a finite value"),
])
def test_ds_config_values_of_the_wrong_type_name_the_key(tmp_path, config, key):
    path = _ds(tmp_path, config)
    _error(_run("predict", "--params", "125M", "--ds-config", path), path, key)


@pytest.mark.slow  # imports DeepSpeed (about 4 s)
@pytest.mark.deepspeed
@pytest.mark.parametrize("text", ["yes", "on", "1", "True", "false", "off", "0"])
def test_ds_config_booleans_read_as_deepspeed_reads_them(tmp_path, text):
    from zeroest.estimator.catalog.models import standard_shape
    from zeroest.estimator.configs.read import setup_from_configs

    precision = pytest.importorskip("deepspeed.runtime.precision_config")

    path = _ds(tmp_path, {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": text}})
    setup, _ = setup_from_configs(path, None, {"model": standard_shape(125 * 10**6)})
    assert (setup.dtype == "bf16") is precision.DeepSpeedBF16Config(enabled=text).enabled


def test_lora_options_without_a_rank():
    _error(_run("predict", "--params", "125M", "--modules-to-save", "lm_head"), "--modules-to-save", "--lora-rank")
    result = _run("predict", "--params", "125M", "--stage", "2", "--lora-alpha", "32")
    assert result.exit_code == 0 and "--lora-alpha 32 ignored" in result.output


def test_flash_attention_in_fp32_is_refused():  # estimated silently before; flash-attn stops at the first forward
    _error(_run("predict", "--params", "125M", "--attn", "flash", "--dtype", "fp32"), "--attn flash", "fp32")


@pytest.mark.parametrize("pattern", ["nosuch", "["])
def test_freeze_pattern_matching_nothing(pattern):
    _error(_run("predict", "--params", "125M", "--freeze", pattern), "--freeze", repr(pattern))


def test_count_flags_take_zero_where_deepspeed_does():
    assert _run("predict", "--params", "125M", "--stage", "3", "--param-persistence-threshold", "0").exit_code == 0
    _error(_run("predict", "--params", "125M", "--reduce-bucket-size", "-5"), "--reduce-bucket-size", "elements")


def test_output_paths_of_the_wrong_kind(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    _error(_run("claims", "--plot", str(tmp_path / "x.txt")), "--plot", ".png")  # matplotlib's traceback before
    _error(_run("claims", "--plot", str(tmp_path)), "--plot", "folder")  # wrote <folder>.png silently before
    _error(_run("report", "--markdown", str(tmp_path)), "--markdown", "folder")
    _error(_run("report", "--plots", str(tmp_path / "file.txt")), "--plots", "is a file")


@pytest.mark.parametrize(("text", "words"), [
    ("distributed_type: NO\nnum_processes: 1\n", ("distributed_type is NO", "--stage 0")),  # YAML's false
    ("distributed_type: FSDP\nnum_processes: 2\n", ("FSDP", "does not model")),
    ("distributed_type: DEEPSPEED\nnum_processes: 2\nnum_machines: 0\n", ("num_machines",)),
    ("deepspeed_config:\n  zero_stage: 3\n  zero3_init_flag: maybe\n", ("zero3_init_flag",)),  # read as false before
])
def test_accelerate_config_names_what_it_cannot_estimate(tmp_path, text, words):
    path = tmp_path / "acc.yaml"
    path.write_text(text)
    _error(_run("predict", "--params", "125M", "--accelerate-config", str(path)), str(path), *words)


def test_accelerate_fp8_trains_deepspeed_in_bf16(tmp_path):
    from zeroest.estimator.catalog.models import standard_shape
    from zeroest.estimator.configs.read import setup_from_configs

    path = tmp_path / "acc.yaml"
    path.write_text("distributed_type: DEEPSPEED\nnum_processes: 2\nmixed_precision: fp8\n"
                    "deepspeed_config:\n  zero_stage: 2\n")
    setup, warnings = setup_from_configs(None, path, {"model": standard_shape(125 * 10**6)})
    assert setup.dtype == "bf16" and any("fp8" in line for line in warnings)  # it was fp32, silently


@pytest.mark.parametrize(("args", "word"), [
    (("--gpus", "0"), "--gpus"),
    (("--master-port", "99999"), "--master-port"),
    (("--launcher", "deepspeed", "--hostfile", "/nonexistent/hosts"), "--hostfile"),
    (("--nnodes", "2", "--node-rank", "3", "--master-port", "29500"), "--node-rank"),
])
def test_validate_options_checked_before_planning(tmp_path, args, word):
    _error(_run("validate", "--dry-run", "--cpu", "--grid", "quick", "--out", str(tmp_path), *args), word)


def test_plan_global_batch_is_bounded():
    _error(_run("plan", "--gpu", "h100", "--params", "125M", "--global-batch", str(10**12)), "--global-batch")


# Nonsense accepted silently ---------------------------------------------------------------------------------------


def test_stage0_with_optimizer_offload():
    _error(_run("predict", "--params", "125M", "--stage", "0", "--offload-optimizer", "cpu"), "stage", "offload")


@pytest.mark.parametrize("top", ["0", "-1"])
def test_plan_top_must_be_positive(top):
    _error(_run("plan", "--gpu", "h100", "--params", "125M", "--top", top), "--top")


def test_grid_with_no_runs(tmp_path):
    from zeroest.validate.grid import parse_grid

    with pytest.raises(ValueError, match="runs: is an empty list"):
        parse_grid("runs: []\n", "g.yaml")


def test_validate_without_torch_is_an_error(monkeypatch, tmp_path):
    from zeroest.validate import runner as validate_runner

    monkeypatch.setattr(validate_runner, "missing_packages", lambda: ["torch", "deepspeed"])
    _error(_run("validate", "--cpu", "--grid", "quick", "--out", str(tmp_path / "o")), "torch", "pip install")


def test_crashed_runs_are_not_done():
    from zeroest.validate.runner import _crashed

    rows = [{"run_key": "a", "status": "crashed"}, {"run_key": "b", "status": "ok"}, {"run_key": "c", "status": "oom"}]
    assert _crashed(rows) == {"a"}


def test_paper_warns_that_offload_is_ignored():
    result = _run("predict", "--params", "1.3B", "--stage", "2", "--paper", "--offload-optimizer", "cpu")
    assert result.exit_code == 0, result.output
    assert "--offload-optimizer cpu is ignored" in result.output


def test_accelerate_multi_gpu_is_not_estimated_as_zero(tmp_path):
    path = tmp_path / "acc.yaml"
    path.write_text("distributed_type: MULTI_GPU\nnum_processes: 2\nmixed_precision: bf16\n")
    _error(_run("predict", "--params", "125M", "--accelerate-config", str(path)), str(path), "MULTI_GPU",
           "DEEPSPEED")


# Flags a config file overrides, and keys not modelled ---------------------------------------------------------------


@pytest.mark.parametrize(("flag", "value", "key"), [
    ("--micro-batch", "4", "train_micro_batch_size_per_gpu"),
    ("--offload-optimizer", "cpu", "zero_optimization.offload_optimizer.device"),
    ("--dtype", "fp16", "bf16.enabled"),
])
def test_flag_contradicting_the_ds_config_is_a_conflict(tmp_path, flag, value, key):
    path = _ds(tmp_path, {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True},
                          "zero_optimization": {"stage": 2}})
    _error(_run("predict", "--params", "125M", "--ds-config", path, flag, value), flag, path, key, "drop the flag")


def test_flag_fills_an_auto_value(tmp_path):
    path = _ds(tmp_path, {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2},
                          "bf16": {"enabled": True}})
    result = _run("predict", "--params", "125M", "--ds-config", path, "--micro-batch", "4", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["setup"]["micro_batch"] == 4


@pytest.mark.parametrize("section", [
    {"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 8}},
    {"zero_optimization": {"stage": 3, "zero_quantized_weights": True}},
    {"zero_optimization": {"stage": 3, "zero_quantized_gradients": True}},
    {"zero_optimization": {"stage": 2}, "activation_checkpointing": {"cpu_checkpointing": True}},
    {"zero_optimization": {"stage": 2}, "data_types": {"grad_accum_dtype": "fp32"}},
])
def test_unmodelled_ds_config_keys_are_named(tmp_path, section):
    path = _ds(tmp_path, {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}, **section})
    result = _run("predict", "--params", "125M", "--ds-config", path)
    assert result.exit_code == 0, result.output
    key = next(k for part in section.values() for k in part if k != "stage")
    assert f"{key} = " in result.output and "is not modelled" in result.output


# Errors that blame a flag for a file's value -------------------------------------------------------------------------


def test_file_stage_error_names_the_file_and_key(tmp_path):
    path = _ds(tmp_path, {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 5}})
    line = _error(_run("predict", "--params", "125M", "--ds-config", path), path, "zero_optimization.stage")
    assert "--stage" not in line


def test_file_offload_auto_names_the_file_and_key(tmp_path):
    path = _ds(tmp_path, {"train_micro_batch_size_per_gpu": 1,
                          "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "auto"}}})
    line = _error(_run("predict", "--params", "125M", "--ds-config", path), path,
                  "zero_optimization.offload_optimizer.device")
    assert "--offload-optimizer" not in line


# False warnings on ordinary accelerate YAML ---------------------------------------------------------------------------


def test_ordinary_accelerate_yaml_gives_no_false_warnings(tmp_path):
    path = tmp_path / "acc.yaml"
    path.write_text("distributed_type: DEEPSPEED\nnum_processes: 8\nmixed_precision: bf16\ndeepspeed_config:\n"
                    "  zero_stage: 3\n  gradient_accumulation_steps: 4\n")
    result = _run("predict", "--params", "125M", "--accelerate-config", str(path), "--json")
    assert result.exit_code == 0, result.output
    assert "train_batch_size" not in result.output and "num_processes" not in result.output
    setup = json.loads(result.stdout)["setup"]
    assert (setup["world_size"], setup["grad_accum"]) == (8, 4)
    assert "adamw (torch)" in result.output  # the name the assumptions use


# validate resume keyed by the setup -----------------------------------------------------------------------------------


def test_run_keys_do_not_depend_on_how_out_is_spelled(tmp_path, monkeypatch):
    from zeroest.validate import grid
    from zeroest.validate import runner as validate_runner
    from zeroest.validate.launch import LaunchOptions

    loaded = grid.load_grid("quick")
    entries = grid.apply_overrides(loaded, [], [])
    monkeypatch.chdir(tmp_path)

    def keys(out):
        opts = validate_runner.ValidateOptions(out=out, launch=LaunchOptions(), cpu=True)
        return [run.key for run in validate_runner.plan(entries, loaded.models, opts, visible_gpus=0)]

    assert keys(tmp_path / "a") == keys(tmp_path / "b") == keys(__import__("pathlib").Path("a"))


# Readability -----------------------------------------------------------------------------------------------------


def test_plan_says_why_fewer_rows_than_fitting_setups():
    result = _run("plan", "--gpu", "h100", "--params", "125M", "--stage", "3", "--top", "1")
    assert result.exit_code == 0, result.output
    assert "one row per" in result.output and "(--top)" in result.output


def test_gpu_l40s_is_the_48gb_card():
    result = _run("predict", "--params", "125M", "--stage", "3", "--gpu", "l40s", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["gpu"]["memory_bytes"] == 46068 * 2**20


def test_help_shows_no_bool_metavar():
    result = _run("predict", "--help")
    assert result.exit_code == 0 and "<bool>" not in result.output


# Written configs must run ------------------------------------------------------------------------------------------


def _planned(tmp_path, *extra: str) -> tuple[dict, dict]:
    path = tmp_path / "plan.json"
    result = _run("plan", "--model", "llama-3-8b", "--gpus", "8", "--gpu", "80GiB", "--seq-len", "1024",
                  "--activations", "closed-form", "--stage", "3", "--json", "--write-ds-config", str(path), *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), json.loads(path.read_text())


def test_written_ds_config_loads_in_the_hf_trainer(tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    answer, config = _planned(tmp_path)
    setup = answer["candidates"][0]["setup"]
    assert config["optimizer"]["params"]["lr"] == "auto" and config["gradient_clipping"] == "auto"
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "o"), per_device_train_batch_size=setup[
        "micro_batch"], gradient_accumulation_steps=setup["grad_accum"], bf16=True, use_cpu=True)
    hf = HfTrainerDeepSpeedConfig(config)
    hf.trainer_config_process(args)
    assert not hf.mismatches
    assert "nvme_path" not in json.dumps(config) or "nvme" in json.dumps(setup)


def test_written_ds_config_reads_back_with_the_planned_zero_init(tmp_path):
    answer, _ = _planned(tmp_path)
    best = answer["candidates"][0]
    assert best["setup"]["zero_init"] is True and answer["assumed"]
    again = _run("predict", "--model", "llama-3-8b", "--gpus", "8", "--seq-len", "1024", "--activations",
                 "closed-form", "--json", "--ds-config", str(tmp_path / "plan.json"))
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["peak_allocated_bytes"] == best["peak_allocated_bytes"]


def test_written_for_plain_deepspeed_has_no_auto(tmp_path):
    _, config = _planned(tmp_path, "--write-for", "script")
    assert "auto" not in json.dumps(config)


def test_validate_refuses_allocator_settings_torch_would_refuse(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments")
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    _error(_run("validate", "--grid", "quick", "--cpu", "--dry-run"), "allocator settings", "expandable_segments:True")

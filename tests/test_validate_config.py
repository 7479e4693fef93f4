"""estimator.dsconfig and validate's launch plumbing: pure functions, no DeepSpeed run."""

from __future__ import annotations

import subprocess
import sys

import pytest
from zeroest.estimator.configs.ds_write import FP16_INITIAL_SCALE_POWER, GRADIENT_CLIPPING, ds_config
from zeroest.estimator.configs.flat import setup_from_dict
from zeroest.validate.launch import (
    LaunchOptions,
    arch_list_ok,
    child_env,
    fix_arch_list,
    launch_command,
    package_root,
)


def _setup(**keys):
    return setup_from_dict({"model": "gpt2", **keys})


@pytest.mark.parametrize(("micro", "accum", "world"), [(1, 1, 1), (4, 4, 2), (16, 1, 8), (2, 3, 5)])
def test_train_batch_size_is_micro_times_accum_times_world(micro, accum, world):
    config = ds_config(_setup(micro_batch=micro, grad_accum=accum, world_size=world))
    assert config["train_micro_batch_size_per_gpu"] == micro
    assert config["gradient_accumulation_steps"] == accum
    assert config["train_batch_size"] == micro * accum * world


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_precision_sections(dtype):
    config = ds_config(_setup(dtype=dtype))
    assert config["bf16"]["enabled"] is (dtype == "bf16")
    assert config["fp16"]["enabled"] is (dtype == "fp16")
    if dtype == "fp16":
        assert config["fp16"]["initial_scale_power"] == FP16_INITIAL_SCALE_POWER
        assert config["fp16"]["loss_scale"] == 0  # dynamic


def test_zero_knobs_follow_the_setup():
    setup = _setup(
        stage=3,
        reduce_bucket_size=12_345,
        allgather_bucket_size=23_456,
        prefetch_bucket_size=34_567,
        max_live_parameters=45_678,
        param_persistence_threshold=567,
        sub_group_size=6_789,
    )
    zero = ds_config(setup)["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["overlap_comm"] is True  # DeepSpeed's default for stage 3
    assert zero["reduce_bucket_size"] == 12_345
    assert zero["allgather_bucket_size"] == 23_456
    assert zero["stage3_prefetch_bucket_size"] == 34_567
    assert zero["stage3_max_live_parameters"] == 45_678
    assert zero["stage3_param_persistence_threshold"] == 567
    assert zero["sub_group_size"] == 6_789
    assert "offload_optimizer" not in zero and "offload_param" not in zero


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_stage3_keys_only_at_stage3(stage):
    zero = ds_config(_setup(stage=stage))["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["overlap_comm"] is False
    assert not any(key.startswith("stage3_") for key in zero)


def test_offload_sections_and_cpu_adam():
    setup = _setup(stage=3, offload_optimizer="cpu", offload_params="cpu", optimizer_impl="cpu")
    config = ds_config(setup)
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert config["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    # DeepSpeedCPUAdam comes from the offload itself: plain AdamW, no torch_adam
    assert config["optimizer"]["type"] == "AdamW"
    assert "torch_adam" not in config["optimizer"]["params"]


def test_nvme_offload_names_its_path():
    setup = _setup(stage=3, offload_optimizer="nvme", offload_params="nvme", optimizer_impl="cpu")
    zero = ds_config(setup, nvme_path="/scratch/nvme")["zero_optimization"]
    assert zero["offload_optimizer"]["nvme_path"] == "/scratch/nvme"
    assert zero["offload_param"]["device"] == "nvme"


@pytest.mark.parametrize(
    ("name", "impl", "type_name", "torch_adam"),
    [
        ("adamw", "fused", "AdamW", False),
        ("adamw", "torch", "AdamW", True),
        ("adam", "fused", "Adam", False),
        ("adam", "torch", "Adam", True),
    ],
)
def test_adam_implementations(name, impl, type_name, torch_adam):
    config = ds_config(_setup(optimizer=name, optimizer_impl=impl))
    assert config["optimizer"]["type"] == type_name
    assert config["optimizer"]["params"].get("torch_adam", False) is torch_adam
    assert "zero_allow_untested_optimizer" not in config


def test_torch_optimizers_are_allowed_untested():
    config = ds_config(_setup(optimizer="sgd-momentum", optimizer_impl="torch", stage=2))
    assert config["optimizer"] == {"type": "SGD", "params": {"lr": pytest.approx(1e-4), "momentum": 0.9}}
    assert config["zero_allow_untested_optimizer"] is True


def test_logging_off_and_clipping():
    config = ds_config(_setup())
    assert config["gradient_clipping"] == GRADIENT_CLIPPING
    assert config["steps_per_print"] >= 10**6
    assert config["wall_clock_breakdown"] is False


def test_dsconfig_imports_no_torch():
    code = "import sys, zeroest.estimator.configs.ds_write; print('torch' in sys.modules, 'deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("9.0", True),
        ("8.0;9.0+PTX", True),
        ("7.5 8.6", True),
        ("9.0a", False),
        ("", False),
        (None, False),
        ("sm_90", False),
    ],
)
def test_arch_list_parsing(value, ok):
    assert arch_list_ok(value) is ok


def test_arch_list_set_from_capability_only_when_needed():
    env = {"TORCH_CUDA_ARCH_LIST": "9.0a"}
    fix_arch_list(env, (9, 0))
    assert env["TORCH_CUDA_ARCH_LIST"] == "9.0"
    env = {"TORCH_CUDA_ARCH_LIST": "8.0;9.0"}
    fix_arch_list(env, (9, 0))
    assert env["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0"
    env = {}
    fix_arch_list(env, (8, 6))
    assert env["TORCH_CUDA_ARCH_LIST"] == "8.6"


def test_child_env_keeps_user_nccl_and_adds_package_to_pythonpath():
    base = {"NCCL_DEBUG": "INFO", "NCCL_NVLS_ENABLE": "1", "PYTHONPATH": "/tmp/site"}
    env = child_env(base, cpu=False, capability=(9, 0), gpus="2", threads=4)
    assert env["NCCL_DEBUG"] == "INFO"
    assert env["NCCL_NVLS_ENABLE"] == "1"  # the user's choice stands
    assert env["PYTHONPATH"].split(":") == ["/tmp/site", package_root()]
    assert env["CUDA_VISIBLE_DEVICES"] == "2"
    assert env["OMP_NUM_THREADS"] == "4"
    assert env["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert child_env({}, cpu=False, capability=None)["NCCL_NVLS_ENABLE"] == "0"
    cpu = child_env({}, cpu=True, capability=(9, 0))
    assert cpu["DS_ACCELERATOR"] == "cpu" and cpu["CUDA_VISIBLE_DEVICES"] == ""
    assert "TORCH_CUDA_ARCH_LIST" not in cpu


def test_child_env_sets_the_setups_allocator_in_both_variables_keeping_other_options():
    base = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128,expandable_segments:True"}
    env = child_env(base, cpu=False, capability=None, expandable_segments=False)
    conf = "expandable_segments:False,max_split_size_mb:128"
    assert env["PYTORCH_ALLOC_CONF"] == env["PYTORCH_CUDA_ALLOC_CONF"] == conf
    env = child_env({}, cpu=False, capability=None, expandable_segments=True)
    assert env["PYTORCH_ALLOC_CONF"] == env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    # None keeps the user's settings as they are (no variable added)
    assert "PYTORCH_ALLOC_CONF" not in child_env({}, cpu=False, capability=None)
    assert child_env(base, cpu=False, capability=None)["PYTORCH_CUDA_ALLOC_CONF"] == base["PYTORCH_CUDA_ALLOC_CONF"]


def test_launch_commands(tmp_path):
    spec = tmp_path / "spec.json"
    torchrun = launch_command(
        LaunchOptions(), nproc=2, spec_path=spec, simulated=False, port=1234, accelerate_config=None
    )
    assert torchrun[1:3] == ["-m", "torch.distributed.run"]
    assert "--nproc-per-node=2" in torchrun and "--master-port=1234" in torchrun
    assert torchrun[-4:] == ["-m", "zeroest.validate.worker", "--spec", str(spec)]
    simulated = launch_command(LaunchOptions(), nproc=1, spec_path=spec, simulated=True, port=1, accelerate_config=None)
    assert simulated[1:] == ["-m", "zeroest.validate.worker", "--spec", str(spec)]
    accel = launch_command(
        LaunchOptions(launcher="accelerate"),
        nproc=2,
        spec_path=spec,
        simulated=False,
        port=1,
        accelerate_config=tmp_path / "a.yaml",
    )
    assert accel[1:5] == ["-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "a.yaml")]
    ds = launch_command(
        LaunchOptions(launcher="deepspeed", hostfile="hosts", nnodes=2, master_port=29500),
        nproc=8,
        spec_path=spec,
        simulated=False,
        port=29500,
        accelerate_config=None,
    )
    assert ds[1:3] == ["-m", "deepspeed.launcher.runner"]
    assert "--num_nodes=2" in ds and "--num_gpus=8" in ds and ds[ds.index("--hostfile") + 1] == "hosts"
    assert ds[-4:] == ["--module", "zeroest.validate.worker", "--spec", str(spec)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"launcher": "horovod"}, "unknown launcher"),
        ({"nnodes": 2}, "--master-port"),
        ({"hostfile": "h"}, "--launcher deepspeed"),
    ],
)
def test_bad_launch_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LaunchOptions(**kwargs)


def _accelerate_run(tmp_path, launch: LaunchOptions, **setup):
    """The accelerate.yaml validate writes for one real run of ``setup`` (on the CPU: 2 ranks)."""
    import yaml
    from zeroest.validate.grid import GridEntry
    from zeroest.validate.runner import ValidateOptions, plan, write_accelerate_config

    opts = ValidateOptions(out=tmp_path, launch=launch, cpu=True)
    (run,) = plan([GridEntry(setup={"model": "gpt2", **setup}, where="t:1")], {}, opts, visible_gpus=0)
    ds_path = tmp_path / "ds_config.json"
    path = write_accelerate_config(run, opts, ds_path, port=4321)
    return path.read_text(), yaml.safe_load(path.read_text()), ds_path


@pytest.mark.parametrize(
    ("stage", "zero_init", "flag"),
    [(3, True, True), (3, False, False), (2, True, False), (1, False, False)],
)
def test_accelerate_config_points_at_the_ds_config(tmp_path, stage, zero_init, flag):
    text, config, ds_path = _accelerate_run(
        tmp_path, LaunchOptions(launcher="accelerate"), stage=stage, zero_init=zero_init, offload_optimizer="cpu",
        optimizer_impl="cpu",
    )
    section = config["deepspeed_config"]
    assert config["distributed_type"] == "DEEPSPEED"
    assert section["deepspeed_config_file"] == str(ds_path.resolve())
    assert section["zero3_init_flag"] is flag  # zero_init at stage 3 only
    assert config["num_processes"] == 2 and config["main_process_port"] == 4321 and config["use_cpu"] is True
    # accelerate refuses these next to deepspeed_config_file: they are comments, and live in the ds_config
    assert "zero_stage" not in section and "offload_optimizer_device" not in section
    assert f"# zero_stage: {stage}" in text and "# offload_optimizer_device: cpu" in text


def test_accelerate_config_carries_the_node_and_loads_in_accelerate(tmp_path):
    config_args = pytest.importorskip("accelerate.commands.config.config_args")
    launch = LaunchOptions(launcher="accelerate", nnodes=2, node_rank=1, master_addr="10.0.0.7", master_port=29555)
    _, config, _ = _accelerate_run(tmp_path, launch, stage=3, zero_init=True, gpus_per_node=4, nodes=2)
    assert (config["machine_rank"], config["main_process_ip"], config["num_machines"]) == (1, "10.0.0.7", 2)
    assert config["num_processes"] == 8
    loaded = config_args.ClusterConfig.from_yaml_file(tmp_path / "accelerate.yaml")
    assert loaded.deepspeed_config["zero3_init_flag"] is True and loaded.num_processes == 8


def test_deepspeed_env_file_carries_our_fixes_to_other_nodes():
    from zeroest.validate.launch import deepspeed_env_file

    env = {"NCCL_NVLS_ENABLE": "0", "TORCH_CUDA_ARCH_LIST": "9.0", "PYTHONPATH": "/a:/b", "HOME": "/root"}
    assert deepspeed_env_file(env).splitlines() == [
        "NCCL_NVLS_ENABLE=0",
        "PYTHONPATH=/a:/b",
        "TORCH_CUDA_ARCH_LIST=9.0",
    ]

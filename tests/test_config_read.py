"""Reading real ds_config.json / accelerate YAML: "auto" as the HF Trainer resolves it, conflicts, bad input,
round trips through the writers, and the known-key lists against DeepSpeed's and accelerate's own classes."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import yaml
from zeroest.estimator.catalog.models import load_model
from zeroest.estimator.configs.accelerate_write import accelerate_config, accelerate_yaml
from zeroest.estimator.configs.ds_write import ds_config
from zeroest.estimator.configs.files import read_json, read_yaml
from zeroest.estimator.configs.keys import ACCELERATE_KEYS, OFFLOAD_KEYS, ZERO_KEYS
from zeroest.estimator.configs.read import resolve_auto, setup_from_configs
from zeroest.estimator.core.setup import Optimizer, Parallelism, TrainingSetup, Workload, ZeroConfig

LLAMA = load_model("llama-3-8b")
AUTO = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
    "zero_optimization": {
        "stage": 3,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "overlap_comm": True,
    },
}
RESOLVED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "bf16.enabled",
    "fp16.enabled",
    "zero_optimization.reduce_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold",
)


def _get(config: dict, dotted: str):
    for key in dotted.split("."):
        config = config.get(key, {}) if isinstance(config, dict) else {}
    return config


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_auto_resolution_matches_hf_trainer(stage, dtype):
    pytest.importorskip("deepspeed")
    hf_ds = pytest.importorskip("transformers.integrations.deepspeed")
    config = copy.deepcopy(AUTO)
    config["zero_optimization"]["stage"] = stage
    args = SimpleNamespace(
        world_size=4,
        per_device_train_batch_size=3,
        gradient_accumulation_steps=5,
        max_grad_norm=0.7,
        learning_rate=1e-4,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        save_on_each_node=False,
        fp16=dtype == "fp16",
        fp16_full_eval=False,
        bf16=dtype == "bf16",
        bf16_full_eval=False,
        get_warmup_steps=lambda steps: 0,
    )
    hf = hf_ds.HfTrainerDeepSpeedConfig(copy.deepcopy(config))
    hf.trainer_config_process(args)
    hf.trainer_config_finalize(
        args, SimpleNamespace(config=SimpleNamespace(hidden_size=LLAMA.hidden_size)), 10
    )
    ours = resolve_auto(
        config,
        hidden_size=LLAMA.hidden_size,
        micro_batch=3,
        grad_accum=5,
        world_size=4,
        dtype=dtype,
        max_grad_norm=0.7,
    )
    for key in RESOLVED_KEYS:
        assert _get(ours, key) == _get(hf.config, key), key
    assert ours["zero_optimization"]["reduce_bucket_size"] == LLAMA.hidden_size**2
    assert ours["train_batch_size"] == 4 * 3 * 5


def _write(tmp_path, name, data) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data))
    return str(path)


def test_setup_from_auto_ds_config(tmp_path):
    path = _write(tmp_path, "ds.json", AUTO)
    setup, warnings = setup_from_configs(
        path, None, {"model": LLAMA, "gpus_per_node": 8, "micro_batch": 2, "grad_accum": 4, "dtype": "bf16"}
    )
    assert warnings == []
    assert setup.dtype == "bf16" and setup.world_size == 8
    assert (setup.workload.micro_batch, setup.workload.grad_accum) == (2, 4)
    assert setup.zero.stage == 3 and setup.zero.overlap_comm is True
    assert setup.zero.reduce_bucket_size == LLAMA.hidden_size**2
    assert setup.zero.prefetch_bucket_size == int(0.9 * LLAMA.hidden_size**2)
    assert setup.zero.param_persistence_threshold == 10 * LLAMA.hidden_size
    # the Trainer passes one list of parameters when the ds_config builds the optimizer
    assert setup.optimizer == Optimizer(name="adamw", impl="fused", param_groups=1)


def test_batch_conflict_is_flagged(tmp_path):
    config = {
        "train_batch_size": 64,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "zero_optimization": {"stage": 1},
        "bf16": {"enabled": True},
    }
    setup, warnings = setup_from_configs(
        _write(tmp_path, "ds.json", config), None, {"model": LLAMA, "gpus_per_node": 4}
    )
    assert any(
        "train_batch_size 64 != train_micro_batch_size_per_gpu 4 x gradient_accumulation_steps 2 x "
        "world size 4 = 32" in w
        for w in warnings
    )
    assert (setup.workload.micro_batch, setup.workload.grad_accum) == (4, 2)


@pytest.mark.parametrize(
    "given,expected",
    [
        ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4}, (4, 4)),
        ({"train_batch_size": 64, "gradient_accumulation_steps": 8}, (2, 8)),
        ({"train_batch_size": 64}, (16, 1)),
    ],
)
def test_batch_completion_as_deepspeed(tmp_path, given, expected):
    config = {**given, "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}
    setup, warnings = setup_from_configs(
        _write(tmp_path, "ds.json", config), None, {"model": LLAMA, "gpus_per_node": 4}
    )
    assert (setup.workload.micro_batch, setup.workload.grad_accum) == expected
    assert not any("!=" in w for w in warnings)


def test_unknown_keys_name_the_nearest(tmp_path):
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimisation": {},
        "bf16": {"enabled": True},
        "zero_optimization": {
            "stage": 2,
            "overlap_comms": True,
            "offload_optimizer": {"device": "cpu", "pin_memroy": True},
        },
    }
    _, warnings = setup_from_configs(_write(tmp_path, "ds.json", config), None, {"model": LLAMA})
    text = "\n".join(warnings)
    assert "'zero_optimisation'; did you mean 'zero_optimization'?" in text
    assert "'overlap_comms'; did you mean 'overlap_comm'?" in text
    assert "'pin_memroy'; did you mean 'pin_memory'?" in text


def test_malformed_json_names_line_and_column(tmp_path):
    path = tmp_path / "ds.json"
    bad_line = '  "zero_optimization": {"stage": 2,}'
    path.write_text('{\n  "bf16": {"enabled": true},\n' + bad_line + "\n}\n")
    column = bad_line.index(",}") + 2  # 1-based column of the "}" after the trailing comma
    with pytest.raises(ValueError, match=rf"ds\.json:3:{column}: invalid JSON"):
        read_json(path)


def test_malformed_yaml_names_line_and_column(tmp_path):
    path = tmp_path / "acc.yaml"
    path.write_text("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: [2\nnum_processes: 8\n")
    with pytest.raises(ValueError, match=r"acc\.yaml:4:\d+: invalid YAML"):
        read_yaml(path)


def test_accelerate_inline_section(tmp_path):
    acc = {
        "distributed_type": "DEEPSPEED",
        "mixed_precision": "fp16",
        "num_processes": 16,
        "num_machines": 2,
        "deepspeed_config": {
            "zero_stage": 3,
            "offload_optimizer_device": "cpu",
            "offload_param_device": "cpu",
            "gradient_accumulation_steps": 4,
        },
    }
    setup, _ = setup_from_configs(None, _write(tmp_path, "acc.yaml", acc), {"model": LLAMA, "micro_batch": 2})
    assert setup.parallel == Parallelism(gpus_per_node=8, nodes=2)
    assert setup.dtype == "fp16"
    assert setup.zero.stage == 3
    assert (setup.zero.offload_optimizer, setup.zero.offload_params) == ("cpu", "cpu")
    assert (setup.workload.micro_batch, setup.workload.grad_accum) == (2, 4)
    assert setup.optimizer.impl == "cpu"


def test_accelerate_fields_ignored_with_ds_file(tmp_path):
    _write(tmp_path, "ds.json", {**AUTO, "bf16": {"enabled": True}, "fp16": {"enabled": False}})
    acc = {
        "distributed_type": "DEEPSPEED",
        "mixed_precision": "fp16",
        "num_processes": 8,
        "deepspeed_config": {"deepspeed_config_file": "ds.json", "zero_stage": 2},
    }
    setup, warnings = setup_from_configs(None, _write(tmp_path, "acc.yaml", acc), {"model": LLAMA})
    text = "\n".join(warnings)
    assert "zero_stage, mixed_precision are ignored because deepspeed_config_file is set" in text
    assert "mixed_precision fp16 but" in text and "enables bf16" in text
    assert setup.zero.stage == 3  # the DeepSpeed file's
    assert setup.dtype == "bf16"


def _resolved_overlap(setup: TrainingSetup) -> TrainingSetup:
    """What reading the written files gives back: DeepSpeed's overlap_comm default made explicit; zero.Init as the
    written accelerate config's zero3_init_flag says (the setup's own)."""
    zero = replace(setup.zero, overlap_comm=setup.zero.overlap, zero_init=setup.zero.builds_partitioned)
    return replace(setup, zero=zero)


def setups():
    model = load_model("qwen2.5-0.5b")
    return [
        TrainingSetup(
            model=model,
            parallel=Parallelism(gpus_per_node=4, nodes=2),
            dtype=dtype,
            optimizer=Optimizer(name="adamw", impl="cpu" if off != "none" else "fused"),
            zero=ZeroConfig(stage=stage, offload_optimizer=off, offload_params=par, zero_init=zinit),
            workload=Workload(micro_batch=3, grad_accum=2, seq_len=1024, activations="closed-form"),
        )
        for stage, off, par, dtype, zinit in (
            (0, "none", "none", "bf16", False),
            (2, "cpu", "none", "fp16", False),
            (3, "cpu", "cpu", "bf16", True),
            (3, "none", "none", "fp32", False),
            (3, "none", "none", "bf16", True),
        )
    ]


@pytest.mark.parametrize(
    "setup", setups(), ids=lambda s: f"z{int(s.stage)}-{s.zero.offload_params}-{s.dtype}-init{int(s.zero.zero_init)}"
)
def test_round_trip_ds_config_and_accelerate(tmp_path, setup):
    ds_path = _write(tmp_path, "ds.json", ds_config(setup))
    base = {"model": setup.model, "seq_len": 1024, "activations": "closed-form"}
    acc_path = tmp_path / "acc.yaml"
    acc_path.write_text(accelerate_yaml(setup, ds_config_file=ds_path))
    again, warnings = setup_from_configs(None, acc_path, base)
    assert again == _resolved_overlap(setup)  # ds_config writes DeepSpeed's overlap_comm default explicitly
    assert not [w for w in warnings if "!=" in w or "unknown" in w]
    inline = tmp_path / "inline.yaml"
    inline.write_text(accelerate_yaml(setup))
    back, _ = setup_from_configs(None, inline, {**base, "micro_batch": 3})
    assert (back.zero.stage, back.zero.offload_optimizer, back.zero.offload_params) == (
        setup.zero.stage,
        setup.zero.offload_optimizer,
        setup.zero.offload_params,
    )
    assert (back.dtype, back.parallel, back.workload) == (setup.dtype, setup.parallel, setup.workload)


@pytest.mark.parametrize(
    "setup", setups(), ids=lambda s: f"z{int(s.stage)}-{s.zero.offload_params}-{s.dtype}-init{int(s.zero.zero_init)}"
)
def test_written_ds_config_loads_in_deepspeed(setup):
    """DeepSpeed's own config classes accept the file. DeepSpeedConfig needs no process group here (it falls
    back to world size 1), so train_batch_size is checked world-size-free: micro x accum, and the identity
    separately."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    config = ds_config(setup)
    world = setup.world_size
    assert config["train_batch_size"] == (
        config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * world
    )
    one_rank = {**config, "train_batch_size": config["train_batch_size"] // world}
    parsed = DeepSpeedConfig(one_rank)
    assert parsed.zero_config.stage == int(setup.stage)
    assert parsed.zero_optimization_stage == int(setup.stage)
    assert parsed.gradient_accumulation_steps == setup.workload.grad_accum
    assert parsed.train_micro_batch_size_per_gpu == setup.workload.micro_batch
    assert str(
        parsed.zero_config.offload_optimizer.device if parsed.zero_config.offload_optimizer else "none"
    ).endswith(setup.zero.offload_optimizer)


def test_written_accelerate_config_loads_in_accelerate(tmp_path):
    config_args = pytest.importorskip("accelerate.commands.config.config_args")
    setup = setups()[2]
    path = tmp_path / "acc.yaml"
    path.write_text(accelerate_yaml(setup))
    loaded = config_args.ClusterConfig.from_yaml_file(path)
    assert loaded.num_processes == setup.world_size and loaded.num_machines == setup.parallel.nodes
    assert loaded.deepspeed_config["zero_stage"] == 3
    assert str(loaded.mixed_precision) == "bf16"
    assert set(accelerate_config(setup)) <= set(ACCELERATE_KEYS)


def test_zero_keys_match_deepspeed():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.offload_config import (
        DeepSpeedZeroOffloadOptimizerConfig,
        DeepSpeedZeroOffloadParamConfig,
    )

    names = set()
    for name, info in DeepSpeedZeroConfig.model_fields.items():
        names.add(name)
        if info.alias:
            names.add(info.alias)
    assert names <= set(ZERO_KEYS)
    assert set(DeepSpeedZeroOffloadOptimizerConfig.model_fields) <= set(OFFLOAD_KEYS["offload_optimizer"])
    assert set(DeepSpeedZeroOffloadParamConfig.model_fields) <= set(OFFLOAD_KEYS["offload_param"])


def test_accelerate_keys_match_cluster_config():
    config_args = pytest.importorskip("accelerate.commands.config.config_args")
    import dataclasses

    assert {f.name for f in dataclasses.fields(config_args.ClusterConfig)} <= set(ACCELERATE_KEYS)


@pytest.mark.parametrize("config, base, groups", [
    (AUTO, {}, 1),  # the Trainer builds DeepSpeed's optimizer from one list of parameters
    ({k: v for k, v in AUTO.items() if k != "optimizer"}, {}, 2),  # the Trainer's own: decay and no decay
    ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}, {}, 2),  # a script's grouping: the larger case
    (AUTO, {"param_groups": 3}, 3),  # the flag wins
])
def test_parameter_groups_follow_who_builds_the_optimizer(tmp_path, config, base, groups):
    path = _write(tmp_path, "ds.json", config)
    setup, _ = setup_from_configs(path, None, {"model": LLAMA, **base})
    assert setup.optimizer.param_groups == groups


def test_adapters_come_from_the_flags(tmp_path):
    """No config file holds peft's LoraConfig: the flags' adapters reach the setup, and are no conflict."""
    from zeroest.api import predict_request

    path = _write(tmp_path, "ds.json", {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}})
    flags = {"lora_rank": 16, "lora_targets": "q_proj,v_proj", "activations": "closed-form"}
    (by_file,) = predict_request(LLAMA, flags, ds_config=path).estimates
    assert (by_file.setup.adapters.lora_rank, by_file.setup.adapters.lora_targets) == (16, "q_proj,v_proj")

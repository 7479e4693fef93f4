"""The accelerate config YAML (as a dict) that launches a ``TrainingSetup`` with DeepSpeed: the one writer, for
``zeroest plan --write-accelerate-config`` and for every run ``zeroest validate --launcher accelerate`` starts.

The ds_config.json itself is ``configs.ds_write.ds_config(setup)``. The accelerate config either points at that
file (``deepspeed_config_file``: every knob zeroest models is kept) or, without one, carries accelerate's own
``deepspeed_config`` fields, from which accelerate builds a ds_config (accelerate/utils/dataclasses.py
``DeepSpeedPlugin.__post_init__``): stage, offload devices, accumulation, clipping; bucket sizes stay DeepSpeed's
defaults and the micro-batch is the DataLoader's batch size. Keys are those ``accelerate config`` writes
(accelerate/commands/config/cluster.py, config_args.py ``ClusterConfig``).

``zero3_init_flag`` is the setup's ``zero_init`` at stage 3 and false below it. ``accelerate launch`` hands it to
the ranks as ``ACCELERATE_DEEPSPEED_ZERO3_INIT`` (accelerate/utils/launch.py ``prepare_deepspeed_cmd_env``), which
``DeepSpeedPlugin.__post_init__`` reads back as ``zero3_init_flag`` (``is_zero3_init_enabled()``). What makes
transformers build under ``deepspeed.zero.Init`` is a live ``HfDeepSpeedConfig`` of a stage-3 config
(transformers/modeling_utils.py ``_from_config``, ``get_init_context``); accelerate 1.15 creates one in
``DeepSpeedPlugin.set_deepspeed_weakref`` (run when ``Accelerator()`` selects the plugin) whatever the flag says,
so a script that builds its model after ``Accelerator()`` is under zero.Init at stage 3 even with the flag false.
"""

from __future__ import annotations

from zeroest.estimator.configs.ds_write import GRADIENT_CLIPPING
from zeroest.estimator.core.setup import TrainingSetup, ZeroStage

IGNORED_NEXT_TO_FILE: tuple[str, ...] = ("zero_stage", "offload_optimizer_device")
"""Settings written only as comments next to ``deepspeed_config_file``: accelerate refuses them there
(``DeepSpeedPlugin._deepspeed_config_checks``); the ds_config file holds them."""


def zero3_init_flag(setup: TrainingSetup) -> bool:
    """accelerate's ``zero3_init_flag``: build the model under ``deepspeed.zero.Init`` (stage 3 with zero_init)."""
    return setup.stage >= ZeroStage.PARAMETERS and setup.zero.zero_init


def accelerate_config(
    setup: TrainingSetup,
    *,
    ds_config_file: str | None = None,
    machine_rank: int = 0,
    main_process: tuple[str, int] | None = None,
    use_cpu: bool = False,
) -> dict:
    """The accelerate config dict for ``setup``; with ``ds_config_file`` it defers everything to that file.

    With a DeepSpeed file, accelerate refuses ``mixed_precision`` and the ZeRO fields next to it
    (``DeepSpeedPlugin._deepspeed_config_checks``), so they are left out: the file's bf16/fp16 sections decide.
    ``machine_rank``, ``main_process`` (rendezvous host, port) and ``use_cpu`` are the launch fields of one node
    (``zeroest validate`` writes them per run; the static rendezvous needs the port on every node).
    """
    stage3 = setup.stage >= ZeroStage.PARAMETERS
    if ds_config_file is not None:
        deepspeed = {
            "deepspeed_config_file": ds_config_file,
            "deepspeed_multinode_launcher": "standard",
            "zero3_init_flag": zero3_init_flag(setup),
        }
    else:
        deepspeed = {
            "gradient_accumulation_steps": setup.workload.grad_accum,
            "gradient_clipping": GRADIENT_CLIPPING,
            "offload_optimizer_device": str(setup.zero.offload_optimizer),
            "offload_param_device": str(setup.zero.offload_params),
            "zero3_init_flag": zero3_init_flag(setup),
            "zero3_save_16bit_model": stage3,
            "zero_stage": int(setup.stage),
        }
    config = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "deepspeed_config": deepspeed,
        "distributed_type": "DEEPSPEED",
        "downcast_bf16": "no",
        "machine_rank": machine_rank,
        "main_training_function": "main",
        "num_machines": setup.parallel.nodes,
        "num_processes": setup.world_size,
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": use_cpu,
    }
    if main_process is not None:
        config["main_process_ip"], config["main_process_port"] = main_process
    if ds_config_file is None:
        config["mixed_precision"] = {"bf16": "bf16", "fp16": "fp16"}.get(setup.dtype, "no")
    return config


def accelerate_yaml(setup: TrainingSetup, *, ds_config_file: str | None = None, **launch) -> str:
    """``accelerate_config`` as YAML text, keys sorted as ``accelerate config`` writes them; ``launch`` takes
    ``accelerate_config``'s launch fields. Next to a ds_config file, the stage and optimizer offload it holds are
    repeated as comments for the reader."""
    import yaml

    text = yaml.safe_dump(accelerate_config(setup, ds_config_file=ds_config_file, **launch), sort_keys=True)
    if ds_config_file is None:
        return text
    values = {"zero_stage": int(setup.stage), "offload_optimizer_device": str(setup.zero.offload_optimizer)}
    notes = "".join(f"# {key}: {values[key]}  (in deepspeed_config_file)\n" for key in IGNORED_NEXT_TO_FILE)
    return notes + text

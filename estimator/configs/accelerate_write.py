"""The accelerate config YAML (as a dict) that launches a ``TrainingSetup`` with DeepSpeed.

The ds_config.json itself is ``estimator.dsconfig.ds_config(setup)``. The accelerate config either points
at that file (``deepspeed_config_file``: every knob zeroest models is kept) or, without one, carries
accelerate's own ``deepspeed_config`` fields, from which accelerate builds a ds_config
(accelerate/utils/dataclasses.py ``DeepSpeedPlugin.__post_init__``): stage, offload devices, accumulation,
clipping; bucket sizes stay DeepSpeed's defaults and the micro-batch is the DataLoader's batch size. Keys
are those ``accelerate config`` writes (accelerate/commands/config/cluster.py, config_args.py
``ClusterConfig``).
"""

from __future__ import annotations

from zeroest.estimator.configs.ds_write import GRADIENT_CLIPPING
from zeroest.estimator.core.setup import TrainingSetup, ZeroStage


def accelerate_config(setup: TrainingSetup, *, ds_config_file: str | None = None) -> dict:
    """The accelerate config dict for ``setup``; with ``ds_config_file`` it defers everything to that file.

    With a DeepSpeed file, accelerate refuses ``mixed_precision`` and the ZeRO fields next to it
    (``DeepSpeedPlugin._deepspeed_config_checks``), so they are left out: the file's bf16/fp16 sections
    decide.
    """
    stage3 = setup.stage >= ZeroStage.PARAMETERS
    if ds_config_file is not None:
        deepspeed = {"deepspeed_config_file": ds_config_file, "zero3_init_flag": setup.zero.builds_partitioned}
    else:
        deepspeed = {
            "gradient_accumulation_steps": setup.workload.grad_accum,
            "gradient_clipping": GRADIENT_CLIPPING,
            "offload_optimizer_device": str(setup.zero.offload_optimizer),
            "offload_param_device": str(setup.zero.offload_params),
            "zero3_init_flag": setup.zero.builds_partitioned,
            "zero3_save_16bit_model": stage3,
            "zero_stage": int(setup.stage),
        }
    config = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "deepspeed_config": deepspeed,
        "distributed_type": "DEEPSPEED",
        "downcast_bf16": "no",
        "machine_rank": 0,
        "main_training_function": "main",
        "num_machines": setup.parallel.nodes,
        "num_processes": setup.world_size,
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
    }
    if ds_config_file is None:
        config["mixed_precision"] = {"bf16": "bf16", "fp16": "fp16"}.get(setup.dtype, "no")
    return config


def accelerate_yaml(setup: TrainingSetup, *, ds_config_file: str | None = None) -> str:
    """``accelerate_config`` as YAML text, keys in the order ``accelerate config`` writes them (sorted)."""
    import yaml

    return yaml.safe_dump(accelerate_config(setup, ds_config_file=ds_config_file), sort_keys=True)

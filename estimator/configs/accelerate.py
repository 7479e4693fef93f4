"""accelerate's config YAML: its ``deepspeed_config`` section, world size, and the settings it ignores.

accelerate/utils/dataclasses.py ``DeepSpeedPlugin.__post_init__`` builds a ds_config from an inline
``deepspeed_config`` section, or reads ``deepspeed_config_file`` and then refuses its own ZeRO fields next
to it (``_deepspeed_config_checks``); ``set_mixed_precision`` adds the precision section. Keys are checked
against ``config_keys.ACCELERATE_KEYS`` / ``ACCELERATE_DS_KEYS``.
"""

from __future__ import annotations

from pathlib import Path

from zeroest.estimator.configs.files import read_yaml, unknown_key_warnings, whole_number
from zeroest.estimator.configs.keys import ACCELERATE_DS_KEYS, ACCELERATE_KEYS
from zeroest.estimator.core.setup import Parallelism

IGNORED_WITH_DS_FILE: tuple[str, ...] = (
    "gradient_accumulation_steps",
    "gradient_clipping",
    "zero_stage",
    "offload_optimizer_device",
    "offload_param_device",
    "offload_param_nvme_path",
    "offload_optimizer_nvme_path",
    "zero3_save_16bit_model",
    "mixed_precision",
)
"""accelerate/utils/dataclasses.py ``DeepSpeedPlugin._deepspeed_config_checks``: with
``deepspeed_config_file`` these accelerate settings "will be ignored" and ``accelerate launch`` refuses to
start."""


def accelerate_ds_config(acc: dict, base: dict) -> dict:
    """The ds_config accelerate builds from an inline ``deepspeed_config`` (``DeepSpeedPlugin.__post_init__``,
    no config file; ``zero_stage`` defaults to 2) plus ``set_mixed_precision``'s precision section."""
    ds = acc.get("deepspeed_config") or {}
    config = {  # no train_batch_size: accelerate derives it as micro x accumulation x processes
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": ds.get("gradient_accumulation_steps", "auto"),
        "zero_optimization": {
            "stage": ds.get("zero_stage", 2),
            "offload_optimizer": {"device": ds.get("offload_optimizer_device", "none")},
            "offload_param": {"device": ds.get("offload_param_device", "none")},
        },
    }
    mp = acc.get("mixed_precision")
    if mp in ("fp16", "bf16"):
        config[mp] = {"enabled": True}
    return config


def accelerate_world(acc: dict | None, base: dict, warnings: list[str], where: str) -> Parallelism:
    """The world size: the YAML's ``num_processes`` over ``num_machines`` when set, else ``base``'s layout (a
    ``--gpus``/``--nodes`` that disagrees with the YAML is a conflict, ``configs.checks.flag_conflicts``)."""
    gpus, nodes = base.get("gpus_per_node", 1), base.get("nodes", 1)
    if acc and acc.get("num_processes") not in (None, -1):
        machines = whole_number(acc.get("num_machines", 1), "num_machines", where, 1)
        total = whole_number(acc["num_processes"], "num_processes", where, 1)
        if total % machines:
            raise ValueError(f"{where}: num_processes {total} is not a multiple of num_machines {machines}")
        gpus, nodes = total // machines, machines
    return Parallelism(gpus_per_node=gpus, nodes=nodes)


def read_accelerate(acc_path: Path, ds_path: Path | None, warnings: list[str]) -> tuple[dict, Path | None]:
    acc = read_yaml(acc_path)
    where = str(acc_path)
    warnings += unknown_key_warnings(acc, ACCELERATE_KEYS, where, "accelerate rejects it")
    ds = acc.get("deepspeed_config") or {}
    warnings += unknown_key_warnings(
        ds, ACCELERATE_DS_KEYS, f"{where} deepspeed_config", "accelerate ignores it"
    )
    kind = acc.get("distributed_type", "DEEPSPEED")
    kind = "NO" if kind is False else str(kind)  # YAML 1.1 reads a bare NO as false
    if kind != "DEEPSPEED":
        if kind == "NO" or kind.startswith("MULTI_"):  # one process, or torch DDP over some device
            raise ValueError(f"{where}: distributed_type is {kind}: {'one process' if kind == 'NO' else 'torch DDP'}"
                             ", no DeepSpeed, and zeroest models DeepSpeed ZeRO only: set distributed_type: "
                             "DEEPSPEED, or estimate the nearest case, stage 0, with zeroest predict --stage 0 --gpus "
                             f"{'1' if kind == 'NO' else 'N'}")
        raise ValueError(f"{where}: distributed_type is {kind}, which zeroest does not model (DeepSpeed ZeRO only): "
                         "set distributed_type: DEEPSPEED to estimate the DeepSpeed run instead")
    file = ds.get("deepspeed_config_file")
    if file and file != "none":
        ignored = [k for k in IGNORED_WITH_DS_FILE if k in ds or (k == "mixed_precision" and acc.get(k))]
        if ignored:
            warnings.append(
                f"{where}: {', '.join(ignored)} are ignored because deepspeed_config_file is set "
                "(accelerate launch refuses this: DeepSpeedPlugin._deepspeed_config_checks); "
                "set them in the DeepSpeed file"
            )
        named = Path(file) if Path(file).is_absolute() or Path(file).exists() else acc_path.parent / file
        if ds_path is None:
            ds_path = named
        elif named.resolve() != Path(ds_path).resolve():
            warnings.append(
                f"{where}: deepspeed_config_file is {file}, but {ds_path} was given; reading {ds_path}"
            )
    return acc, ds_path

"""Library entry points behind the commands: one call per question, the same answer from every entry point.

``predict_request`` is what ``zeroest predict`` asks: it takes the job as flags (a dict of the flat setup keys), or
as a ds_config.json / accelerate config with the flags filling what the files leave open, expands the stages, finds
the calibration for the GPU, and gives the fit verdict at the one margin of ``catalog.gpus``.

``plan_request`` is what ``zeroest plan`` asks: the search space, the plan or the capacity queries, and the
configs it writes.

Flags and config files: a flag given together with a config file that decides the same thing must agree with the
file, or the request is refused (``ValueError`` naming the flag, the file and its key), the way the HF Trainer
refuses ``TrainingArguments`` that mismatch its ds_config. A flag fills what the file leaves "auto" or open.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from zeroest.estimator.catalog.fit import FIT_MARGIN, Fit, fit_verdict
from zeroest.estimator.catalog.gpus import Gpu, parse_gpu
from zeroest.estimator.core.estimate import Estimate, estimate
from zeroest.estimator.core.setup import TrainingSetup
from zeroest.estimator.core.shape import ModelShape
from zeroest.estimator.core.vocab import OffloadDevice, default_stages


@dataclass(frozen=True)
class Prediction:
    """Estimates of one job (one per stage asked), the GPU and the verdict on it, and what the files said."""

    estimates: list[Estimate]
    gpu: Gpu | None = None
    fits: list[Fit] = field(default_factory=list)
    """One verdict per estimate when a GPU was given."""
    warnings: list[str] = field(default_factory=list)
    """Lines about the config files: conflicts, keys not modelled, values assumed."""


def fit_dict(fit: Fit) -> dict:
    """The verdict as JSON: the GPU, its memory, the margin, the usable bytes and the room left (negative: short)."""
    return {"name": fit.gpu.name, "memory_bytes": fit.gpu.memory_bytes, "fits": fit.fits, "margin": fit.margin,
            "usable_bytes": fit.usable_bytes, "headroom_bytes": fit.headroom_bytes}


def calibration_for(gpu: Gpu | None):
    """The overheads fitted for this GPU and the installed torch/DeepSpeed (major.minor), if a calibration exists;
    else None (the defaults, fitted on an H100)."""
    if gpu is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    from zeroest.estimator.catalog.calibration import find_calibration

    try:
        return find_calibration(gpu.name, version("torch"), version("deepspeed"))
    except PackageNotFoundError:
        return None


def _config_setup(shape: ModelShape, flags: dict, ds_config: Path | None, accelerate_config: Path | None,
                  from_params: bool) -> tuple[TrainingSetup, list[str]]:
    from zeroest.estimator.configs.checks import flag_conflicts
    from zeroest.estimator.configs.read import BASE_KEYS, setup_from_configs

    base = {key: flags[key] for key in BASE_KEYS if key in flags}
    base["model"] = shape
    if from_params:
        base.setdefault("activations", "closed-form")
    setup, warnings = setup_from_configs(ds_config, accelerate_config, base)
    if "mode" in flags:
        setup = replace(setup, mode=flags["mode"])
    where = str(ds_config or accelerate_config)
    conflicts = flag_conflicts(setup, {k: v for k, v in flags.items() if k != "mode"}, where)
    if conflicts:
        raise ValueError(conflicts[0])
    return setup, warnings


def _paper_warnings(setups: list[TrainingSetup]) -> list[str]:
    first = setups[0]
    if first.mode != "paper":
        return []
    offloaded = [f"{name} {device}" for name, device in (("--offload-optimizer", first.zero.offload_optimizer),
                                                          ("--offload-params", first.zero.offload_params))
                 if device != "none"]
    if not offloaded:
        return []
    return [f"--paper: the ZeRO paper's model states (2+2+K) Psi have no offload, so {' and '.join(offloaded)} "
            "is ignored; drop --paper to estimate the offload"]


def build_setup(shape: ModelShape, flags: dict, *, from_params: bool = False, **fixed) -> TrainingSetup:
    """The setup of the given ``flags`` (flat setup keys, plus ``fixed`` keys a command sets itself); what was not
    given takes the setup's defaults and the vocabulary's rules, exactly as a grid or runs.jsonl row does.
    ``--params`` models default to closed-form activations (a standard shape has no HF model to trace)."""
    from zeroest.estimator.configs.flat import setup_from_dict

    data = {**flags, **fixed}
    if from_params:
        data.setdefault("activations", "closed-form")
    return setup_from_dict(data, model=shape, where="")


def predict_request(shape: ModelShape, flags: dict, *, stage: int | None = None, ds_config: Path | None = None,
                    accelerate_config: Path | None = None, gpu: str | Gpu | None = None,
                    margin: float = FIT_MARGIN, from_params: bool = False) -> Prediction:
    """The estimates ``zeroest predict`` prints for this job.

    ``flags`` holds flat setup keys (``configs.flat.SETUP_KEYS``) the user gave; with a config file they fill only
    what the file leaves open. Without ``stage`` (and without a config file), every stage that accepts the offload
    asked for is estimated. ``gpu`` is a preset name, a size, or a ``Gpu``.
    """
    target = parse_gpu(gpu) if isinstance(gpu, str) else gpu
    warnings: list[str] = []
    if ds_config is not None or accelerate_config is not None:
        setup, warnings = _config_setup(shape, flags, ds_config, accelerate_config, from_params)
        if stage is not None and stage != int(setup.stage):
            raise ValueError(f"--stage {stage} contradicts zero_optimization.stage {int(setup.stage)} of the "
                             "config: drop --stage")
        setups = [setup]
    else:
        stages = [stage] if stage is not None else default_stages(
            flags.get("offload_optimizer", OffloadDevice.NONE), flags.get("offload_params", OffloadDevice.NONE))
        setups = [build_setup(shape, flags, from_params=from_params, stage=s) for s in stages]
    warnings += _paper_warnings(setups)
    overheads = calibration_for(target)
    estimates = [estimate(s, overheads) for s in setups]
    fits = [fit_verdict(e.device_bytes, target, margin) for e in estimates] if target is not None else []
    return Prediction(estimates=estimates, gpu=target, fits=fits, warnings=warnings)

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
from typing import TYPE_CHECKING

from zeroest.estimator.catalog.fit import FIT_MARGIN, Fit, fit_verdict
from zeroest.estimator.core.estimate import Estimate, estimate
from zeroest.estimator.core.setup import TrainingSetup
from zeroest.estimator.core.shape import ModelShape
from zeroest.estimator.core.vocab import OffloadDevice, default_stages
from zeroest.estimator.units import GiB

if TYPE_CHECKING:
    from zeroest.estimator.catalog.gpus import Gpu
    from zeroest.estimator.core.overheads import Overheads
    from zeroest.estimator.plan.plan import PlanRequest

MAX_GLOBAL_BATCH = 10**6
"""The largest ``plan --global-batch``, in sequences per optimizer step: hundreds of times the published ones (a few
thousand sequences, some millions of tokens), and small enough that walking its divisors stays quick."""


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


def _lora_warnings(flags: dict) -> list[str]:
    """LoRA's own options given without a LoRA rank: a full fine-tune is estimated and they change nothing.
    (``--modules-to-save`` without a rank is an error instead, in ``core.adapters.Adapters``: it would train a
    copy that no peft setup makes.)"""
    if flags.get("lora_rank"):
        return []
    given = [f"--{key.replace('_', '-')} {flags[key]}" for key in ("lora_alpha", "lora_dropout", "lora_targets")
             if key in flags]
    if not given:
        return []
    return [f"{', '.join(given)} ignored: LoRA is off without --lora-rank (a full fine-tune is estimated); set "
            "--lora-rank to train LoRA adapters"]


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
    asked for is estimated. ``gpu`` is a preset name, a size, or a ``Gpu``; its memory becomes the setups'
    ``gpu_memory_bytes`` (DeepSpeed's capacity branches, ``core.capacity``).
    """
    if isinstance(gpu, str):
        from zeroest.estimator.catalog.gpus import parse_gpu

        gpu = parse_gpu(gpu)
    target = gpu
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
    if target is not None and "gpu_memory_bytes" not in flags:  # the card decides DeepSpeed's init branch
        setups = [s.with_(gpu_memory_bytes=target.memory_bytes) for s in setups]
    warnings += _paper_warnings(setups) + _lora_warnings(flags)
    overheads = calibration_for(target)
    estimates = [estimate(s, overheads) for s in setups]
    fits = [fit_verdict(e.device_bytes, target, margin) for e in estimates] if target is not None else []
    if fits:
        warnings += _expandable_hints(setups, fits, overheads, margin)
    return Prediction(estimates=estimates, gpu=target, fits=fits, warnings=warnings)


def _sequence_plan_note(setup: TrainingSetup, gpu: Gpu, margin: float) -> list[str]:
    """The plan searched with the fitted reserve terms; where the pick is a setup the request sequence covers
    (``core.requests``), its reserve replayed, and whether the pick still fits with it."""
    built = estimate(setup)  # estimate decides whether the sequence covers the pick
    if built.reserved_facts is None or not built.reserved_facts.sequence_reserved_bytes:
        return []
    fitted = estimate(setup, sequence=False)
    verdict = fit_verdict(built.device_bytes, gpu, margin)
    how = (f"it still fits ({verdict.spare_bytes / GiB:.1f} GiB spare)" if verdict.fits else
           f"it misses the card by {verdict.short_bytes / GiB:.1f} GiB at the margin: check it with zeroest predict "
           "and pick the next candidate")
    return [f"the search used the fitted reserve terms ({fitted.peak_reserved_bytes / GiB:.2f} GiB reserved for the "
            f"pick); its request sequence replays to {built.reserved_facts.sequence_reserved_bytes / GiB:.2f} GiB, "
            f"and with the reserve predict gives ({built.peak_reserved_bytes / GiB:.2f} GiB) {how}"]


def _expandable_plan_note(request: PlanRequest) -> list[str]:
    """Where nothing fits with torch's default allocator: the plan's first pick with expandable segments, if one
    fits then (``core.reserved``, ``R_x``)."""
    from zeroest.estimator.plan.plan import describe_setup
    from zeroest.estimator.plan.plan import plan as run_plan

    if request.base.expandable_segments:
        return []
    best = run_plan(replace(request, base=request.base.with_(expandable_segments=True))).best
    if best is None:
        return []
    work = best.setup.workload
    return [f"nothing fits with torch's default allocator, but with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
            f"{describe_setup(best.setup)} at micro-batch {work.micro_batch} fits (plan with --expandable-segments)"]


def _expandable_hints(setups: list[TrainingSetup], fits: list[Fit], overheads: Overheads,
                      margin: float) -> list[str]:
    """A line for each setup that misses the card with torch's default allocator but fits with expandable
    segments, whose reserve keeps fewer free blocks (``core.reserved``, ``R_x``); none where the peak allocation
    itself does not fit."""
    lines = []
    for setup, fit in zip(setups, fits, strict=True):
        if fit.fits or setup.expandable_segments:
            continue
        other = estimate(setup.with_(expandable_segments=True), overheads)
        verdict = fit_verdict(other.device_bytes, fit.gpu, margin)
        if verdict.fits:
            lines.append(f"stage {int(setup.stage)} misses the {fit.gpu.name} by {fit.short_bytes / GiB:.1f} GiB with "
                         f"torch's default allocator but fits with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
                         f"({verdict.spare_bytes / GiB:.1f} GiB spare; predict it with --expandable-segments)")
    return lines


@dataclass(frozen=True)
class PlanAnswer:
    """What ``zeroest plan`` shows: the capacity ``rows`` (queries asked) or the ``plan`` and the candidates
    ``shown``; the chosen setup's explanation, the files written, and notes on what was assumed."""

    request: object
    queries: list[str]
    rows: list[dict] = field(default_factory=list)
    plan: object | None = None
    shown: tuple = ()
    explain: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    write_error: str | None = None
    """Why a file asked for could not be written (the plan above it stands)."""


def _search_space(stages: list[int] | None, offloads: list[str] | None, grad_ckpt: bool | None):
    from zeroest.estimator.plan.plan import SearchSpace

    for s in stages or ():
        if s not in (0, 1, 2, 3):
            raise ValueError(f"--stage must be 0, 1, 2 or 3, got {s}")
    devices = tuple(offloads) if offloads else ("none", "cpu", "nvme")
    if "none" not in devices:
        devices = ("none", *devices)
    return SearchSpace(stages=tuple(sorted(set(stages))) if stages else (0, 1, 2, 3), offload_optimizer=devices,
                       offload_params=devices, grad_ckpt=(False, True) if grad_ckpt is None else (grad_ckpt,))


def _check_target(path: Path | None, flag: str) -> None:
    """Refuse, before the search, a path that cannot be written."""
    if path is None:
        return
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder: give a file name in it, e.g. {path / 'ds_config.json'}")
    if not path.parent.is_dir():
        raise ValueError(f"{flag} {path}: the folder {path.parent} does not exist; create it or pick another path")


def _write_configs(setup: TrainingSetup, ds_path: Path | None, acc_path: Path | None, write_for: str) -> list[str]:
    import json

    from zeroest.estimator.configs.accelerate_write import accelerate_yaml
    from zeroest.estimator.configs.ds_write import ds_config, trainer_arguments, trainer_ds_config

    notes = []
    if ds_path is not None:
        trainer = write_for == "hf-trainer"
        config = trainer_ds_config(setup) if trainer else ds_config(setup)
        ds_path.write_text(json.dumps(config, indent=2) + "\n")
        notes.append(f"wrote {ds_path}" + (f" for the HF Trainer: run it with {trainer_arguments(setup)}"
                                           if trainer else " for deepspeed.initialize"))
        if "nvme" in (setup.zero.offload_optimizer, setup.zero.offload_params):
            notes.append(f"  set nvme_path in {ds_path} to a folder on your NVMe drive (it says /local_nvme)")
    if acc_path is not None:
        ref = None if ds_path is None else str(ds_path)
        acc_path.write_text(accelerate_yaml(setup, ds_config_file=ref))
        notes.append(f"wrote {acc_path}"
                     + ("" if ref else f" (set your DataLoader's batch size to {setup.workload.micro_batch})"))
    return notes


def this_machine_ram_bytes() -> int:
    """Physical memory of this machine (``sysconf``), the default host RAM per node that ``plan`` checks."""
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plan_request(shape: ModelShape, flags: dict, *, gpu: str, margin: float = FIT_MARGIN,
                 global_batch: int | None = None, host_ram: str | None = None, stages: list[int] | None = None,
                 offloads: list[str] | None = None, queries: list[str] | None = None, top: int = 10,
                 explain: bool = False, write_ds_config: Path | None = None,
                 write_accelerate_config: Path | None = None, write_for: str = "hf-trainer",
                 from_params: bool = False) -> PlanAnswer:
    """The plan ``zeroest plan`` prints: the setups that fit ``gpu``, fastest first (``top`` of them), or the
    capacity ``queries`` (``plan.QUERIES``) per ZeRO group; the chosen setup's configs written where asked.

    A written ds_config for the HF Trainer (``write_for`` hf-trainer, its "auto" values) is built under zero.Init
    at stage 3, so unless ``flags`` says ``zero_init`` the plan assumes the same (``vocab.zero_init_default``).
    """
    from zeroest.estimator.core.estimate import estimate as estimate_setup
    from zeroest.estimator.core.vocab import Builder, loop_default, param_groups_default, zero_init_default
    from zeroest.estimator.plan.explain import explain as explain_lines
    from zeroest.estimator.plan.plan import PlanRequest, capacity_queries
    from zeroest.estimator.plan.plan import plan as run_plan
    from zeroest.estimator.units import parse_bytes

    queries = list(queries or [])
    if top < 1:
        raise ValueError(f"--top {top}: show at least one setup (--top 1 or more)")
    if global_batch is not None and not 1 <= global_batch <= MAX_GLOBAL_BATCH:
        raise ValueError(f"--global-batch {global_batch}: give 1 to {MAX_GLOBAL_BATCH:,} sequences per optimizer "
                         "step (the search walks every micro-batch that divides it)")
    if queries and (write_ds_config or write_accelerate_config):
        raise ValueError(f"--{queries[0].replace('_', '-')} answers a question and chooses no setup, so there is "
                         "nothing to write: drop --write-ds-config / --write-accelerate-config, or the query")
    _check_target(write_ds_config, "--write-ds-config")
    _check_target(write_accelerate_config, "--write-accelerate-config")
    flags = dict(flags)
    grad_ckpt = flags.pop("grad_ckpt", None)
    notes = _lora_warnings(flags)
    if write_ds_config is not None and "zero_init" not in flags:
        flags["zero_init"] = zero_init_default(3, Builder(write_for))
        how = ("under zero.Init, as the HF Trainer does with the written ds_config" if flags["zero_init"]
               else "whole, without zero.Init, as a plain script does")
        notes.append(f"planned with stage 3 building the model {how} (--zero-init/--no-zero-init changes it)")
    if write_ds_config is not None and "param_groups" not in flags:
        flags["param_groups"] = param_groups_default(Builder(write_for), optimizer_section=True)
    if write_ds_config is not None and "loop" not in flags:
        flags["loop"] = loop_default(Builder(write_for))
        notes.append(f"planned with the {flags['loop']} training loop, as the written ds_config is read back "
                     "(--loop changes it)")
    from zeroest.estimator.catalog.gpus import parse_gpu

    card = parse_gpu(gpu)
    flags.setdefault("gpu_memory_bytes", card.memory_bytes)  # the card decides DeepSpeed's init branch
    base = build_setup(shape, flags, from_params=from_params, stage=0)
    if host_ram:
        host_ram_bytes = parse_bytes(host_ram)
    else:
        host_ram_bytes = this_machine_ram_bytes()
        notes.append(f"host RAM per node checked against this machine's {host_ram_bytes / 2**30:.0f} GiB "
                     "(--host-ram sets the training nodes')")
    request = PlanRequest(base=base, gpu=card, margin=margin, global_batch=global_batch,
                          host_ram_bytes=host_ram_bytes,
                          space=_search_space(stages, offloads, grad_ckpt))
    if queries:
        return PlanAnswer(request=request, queries=queries, rows=capacity_queries(request, queries), notes=notes)
    result = run_plan(request)
    if result.best is None:
        return PlanAnswer(request=request, queries=[], plan=result, notes=notes + _expandable_plan_note(request))
    notes += _sequence_plan_note(result.best.setup, card, margin)
    lines = explain_lines(estimate_setup(result.best.setup)) if explain else []
    try:
        written = _write_configs(result.best.setup, write_ds_config, write_accelerate_config, write_for)
        error = None
    except OSError as exc:
        written, error = [], f"cannot write the chosen setup's config: {exc.strerror} ({exc.filename}); pick a path"
    return PlanAnswer(request=request, queries=[], plan=result, shown=result.candidates[:top], explain=lines,
                      written=written, notes=notes, write_error=error)

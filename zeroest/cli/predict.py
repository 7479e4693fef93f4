"""``zeroest predict``: per-GPU memory of one setup, or of each ZeRO stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from zeroest.cli import options as o
from zeroest.cli.common import err, fail, out


def _stages(stage: int | None, offload_optimizer: str, offload_params: str) -> list[int]:
    if stage is not None:
        if stage not in (0, 1, 2, 3):
            fail(f"--stage must be 0, 1, 2 or 3, got {stage}")
        return [stage]
    if offload_params != "none" or offload_optimizer == "nvme":
        return [3]
    return [1, 2, 3] if offload_optimizer != "none" else [0, 1, 2, 3]


def _calibration(gpu):
    """The calibration fitted for this GPU and the installed torch/DeepSpeed (major.minor), if one exists; else
    None (the defaults, fitted on an H100)."""
    if gpu is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    from zeroest.estimator.catalog.calibration import find_calibration

    try:
        return find_calibration(gpu.name, version("torch"), version("deepspeed"))
    except PackageNotFoundError:
        return None


def predict(
    params: o.ParamsOpt = None,
    model: o.ModelOpt = None,
    gpus: o.GpusOpt = 1,
    nodes: o.NodesOpt = 1,
    stage: Annotated[int | None, typer.Option("--stage", help="One ZeRO stage (0-3); default: all.")] = None,
    dtype: o.DtypeOpt = o.Dtype.bf16,
    optimizer: o.OptOpt = o.OptName.adamw,
    optimizer_impl: o.ImplOpt = None,
    offload_optimizer: o.OffOptOpt = o.Offload.none,
    offload_params: o.OffParOpt = o.Offload.none,
    grad_accum: o.AccumOpt = 1,
    overlap_comm: o.OverlapOpt = None,
    reduce_bucket_size: o.BucketOpt = None,
    allgather_bucket_size: o.BucketOpt = None,
    prefetch_bucket_size: o.BucketOpt = None,
    max_live_parameters: o.BucketOpt = None,
    param_persistence_threshold: o.BucketOpt = None,
    sub_group_size: o.BucketOpt = None,
    micro_batch: o.MicroOpt = 1,
    seq_len: o.SeqOpt = 2048,
    grad_ckpt: o.CkptOpt = False,
    attn: o.AttnOpt = o.Attn.sdpa,
    activations: o.ActOpt = None,
    gpu: Annotated[str | None, typer.Option("--gpu", help="Check the fit: 4090, a100-40g, a100-80g, h100, h200 "
                                            "or a size such as 24GiB.")] = None,
    paper: Annotated[bool, typer.Option("--paper", help="The ZeRO paper's model states, (2+2+K) Psi, K = 12.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (one object with --stage, else a list).")] = False,
    ds_config: Annotated[Path | None, typer.Option(
        "--ds-config", dir_okay=False, help="Estimate the setup this ds_config.json trains; its \"auto\" values "
        "are filled from the other flags as the HF Trainer fills them.")] = None,
    accelerate_config: Annotated[Path | None, typer.Option(
        "--accelerate-config", dir_okay=False, help="Estimate the setup this accelerate config YAML launches "
        "(with --ds-config or its deepspeed_config_file).")] = None,
    explain: Annotated[bool, typer.Option(
        "--explain", help="Say where the memory goes and which knob frees the most.")] = False,
) -> None:
    """Predict per-GPU memory for each ZeRO stage, or for the setup of a ds_config.json / accelerate config."""
    from zeroest.cli.render import print_estimates
    from zeroest.estimator.catalog.gpus import parse_gpu
    from zeroest.estimator.core.estimate import estimate

    knobs = dict(reduce_bucket_size=reduce_bucket_size, allgather_bucket_size=allgather_bucket_size,
                 prefetch_bucket_size=prefetch_bucket_size, max_live_parameters=max_live_parameters,
                 param_persistence_threshold=param_persistence_threshold, sub_group_size=sub_group_size)
    try:
        shape = o.resolve_model(params, model)
        if seq_len > shape.max_positions:
            err.print(f"zeroest: warning: --seq-len {seq_len} is beyond {shape.name}'s max_position_embeddings "
                      f"({shape.max_positions}); the estimate assumes the model runs at that length anyway",
                      markup=False)
        target = parse_gpu(gpu) if gpu else None
        if ds_config or accelerate_config:
            from zeroest.estimator.configs.read import setup_from_configs

            base = dict(model=shape, gpus_per_node=gpus, nodes=nodes, micro_batch=micro_batch,
                        grad_accum=grad_accum, seq_len=seq_len, grad_ckpt=grad_ckpt, attn=attn.value,
                        dtype=dtype.value, optimizer=optimizer.value,
                        activations=activations.value if activations else ("closed-form" if params else "auto"))
            setup, warnings = setup_from_configs(ds_config, accelerate_config, base)
            for line in warnings:
                err.print(f"zeroest: warning: {line}", markup=False)
            if stage is not None and stage != int(setup.stage):
                fail(f"--stage {stage} contradicts zero_optimization.stage {int(setup.stage)} of the config: "
                     "drop --stage")
            stage = int(setup.stage)
            setups = [setup]
        else:
            setups = [
                o.build_setup(shape=shape, stage=s, gpus=gpus, nodes=nodes, dtype=dtype.value,
                              optimizer=optimizer.value,
                              impl=optimizer_impl.value if optimizer_impl else None,
                              offload_optimizer=offload_optimizer.value, offload_params=offload_params.value,
                              grad_accum=grad_accum, overlap_comm=overlap_comm, knobs=knobs, micro_batch=micro_batch,
                              seq_len=seq_len, grad_ckpt=grad_ckpt, attn=attn.value,
                              activations=activations.value if activations else None, from_params=params is not None,
                              paper=paper)
                for s in _stages(stage, offload_optimizer.value, offload_params.value)
            ]
        overheads = _calibration(target)
        estimates = [estimate(s, overheads) for s in setups]
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    if explain:
        from zeroest.estimator.plan.explain import explain as explain_lines
    if as_json:
        docs = [e.to_dict() for e in estimates]
        if explain:
            for d, est in zip(docs, estimates, strict=True):
                d["explain"] = explain_lines(est)
        if target is not None:
            for d in docs:
                d["gpu"] = {"name": target.name, "memory_bytes": target.memory_bytes,
                            "fits": d["device_bytes"] <= target.memory_bytes}
        out.print_json(json.dumps(docs[0] if stage is not None else docs))
        return
    print_estimates(estimates, target, out)
    if explain:
        for est in estimates:
            out.print(f"stage {est.stage}:", style="bold")
            for line in explain_lines(est):
                out.print(f"  {line}", markup=False)

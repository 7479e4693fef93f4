"""``zeroest predict``: per-GPU memory of one setup, or of each ZeRO stage."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from zeroest.cli import options as o
from zeroest.cli.common import fail, out, warn
from zeroest.estimator.catalog.fit import FIT_MARGIN

StageOpt = Annotated[int | None, typer.Option("--stage",
                                              help="One ZeRO stage (0-3). Default: every stage that accepts the "
                                              "offload asked for.")]
GpuOpt = Annotated[str | None, typer.Option("--gpu", help=f"Check the fit: {o.GPU_HELP}")]
MarginOpt = Annotated[float, typer.Option("--margin", help="Fraction of the GPU's memory kept free for the fit "
                                          "verdict (fragmentation, other processes, growth not modelled).")]
DsConfigOpt = Annotated[Path | None, typer.Option(
    "--ds-config", dir_okay=False, help="Estimate the setup this ds_config.json trains; its \"auto\" values, "
    "and what it leaves open, are filled from the other flags as the HF Trainer fills them. A flag the file also "
    "decides must agree with it, else it is an error naming the file's key (the HF Trainer's rule).")]
AccConfigOpt = Annotated[Path | None, typer.Option(
    "--accelerate-config", dir_okay=False, help="Estimate the setup this accelerate config YAML launches (with "
    "--ds-config or its deepspeed_config_file); flags follow the --ds-config rule.")]


@o.setup_options(exclude=("stage", "mode", "gpu_memory_bytes"))
def predict(
    params: o.ParamsOpt = None,
    model: o.ModelOpt = None,
    stage: StageOpt = None,
    gpu: GpuOpt = None,
    margin: MarginOpt = FIT_MARGIN,
    paper: Annotated[bool, typer.Option("--paper", help="The ZeRO paper's model states, (2+2+K) Psi, K = 12.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (one object with --stage, else a list).")] = False,
    ds_config: DsConfigOpt = None,
    accelerate_config: AccConfigOpt = None,
    explain: Annotated[bool, typer.Option(
        "--explain", help="Say where the memory goes and which knob frees the most.")] = False,
    flags: dict | None = None,
) -> None:
    """Predict per-GPU memory for each ZeRO stage, or for the setup of a ds_config.json / accelerate config."""
    from zeroest.api import fit_dict, predict_request
    from zeroest.cli.render import print_estimates

    flags = dict(flags or {})
    if stage is not None and stage not in (0, 1, 2, 3):
        fail(f"--stage must be 0, 1, 2 or 3, got {stage}")
    if paper:
        flags["mode"] = "paper"
    try:
        shape = o.resolve_model(params, model)
        seq_len = flags.get("seq_len")
        if seq_len is not None and seq_len > shape.max_positions:
            warn(f"--seq-len {seq_len} is beyond {shape.name}'s max_position_embeddings ({shape.max_positions}); "
                 "the estimate assumes the model runs at that length anyway")
        result = predict_request(shape, flags, stage=stage, ds_config=ds_config, accelerate_config=accelerate_config,
                                 gpu=gpu, margin=margin, from_params=params is not None)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    for line in result.warnings:
        warn(line)
    one = stage is not None or ds_config is not None or accelerate_config is not None
    if explain:
        from zeroest.estimator.plan.explain import explain as explain_lines
    if as_json:
        import json

        docs = [e.to_dict() for e in result.estimates]
        for i, (doc, est) in enumerate(zip(docs, result.estimates, strict=True)):
            if explain:
                doc["explain"] = explain_lines(est)
            if result.fits:
                doc["gpu"] = fit_dict(result.fits[i])
        out.print_json(json.dumps(docs[0] if one else docs))
        return
    print_estimates(result.estimates, result.fits, out)
    if explain:
        for est in result.estimates:
            out.print(f"stage {est.stage}:", style="bold")
            for line in explain_lines(est):
                out.print(f"  {line}", markup=False)

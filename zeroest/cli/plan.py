"""``zeroest plan``: the ZeRO setups that fit a cluster, ranked by a step-time proxy; and capacity queries.

Registered by ``zeroest.cli`` as ``app.command("plan")(plan)``. Parses, calls ``zeroest.api.plan_request``,
renders (``render_plan``). Errors go through ``cli.fail`` (stderr, exit code 2).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from zeroest.cli import options as o
from zeroest.estimator.catalog.fit import FIT_MARGIN
from zeroest.estimator.core.vocab import Builder, OffloadDevice

GpuOpt = Annotated[str, typer.Option("--gpu", help=f"The GPU: {o.GPU_HELP}")]
StageOpt = Annotated[
    list[int] | None, typer.Option("--stage", help="Only these ZeRO stages (repeat the flag); default: 0-3.")
]
OffloadsOpt = Annotated[
    list[OffloadDevice] | None,
    typer.Option(
        "--offload", help="Offload devices the plan may use (repeat the flag); default: none, cpu and nvme."
    ),
]
_QUERY_HELP = (
    "per ZeRO stage/offload/checkpointing, instead of planning (at --micro-batch, --grad-accum and "
    "--seq-len as given)."
)
MaxMicroOpt = Annotated[
    bool, typer.Option("--max-micro-batch", help=f"The largest micro-batch that fits, {_QUERY_HELP}")
]
MaxSeqOpt = Annotated[
    bool, typer.Option("--max-seq-len", help=f"The longest sequence that fits, {_QUERY_HELP}")
]
MinGpusOpt = Annotated[
    bool, typer.Option("--min-gpus", help=f"The fewest GPUs that hold the setup, {_QUERY_HELP}")
]


@o.setup_options(exclude=("stage", "offload_optimizer", "offload_params", "optimizer_impl", "mode",
                           "gpu_memory_bytes"))
def plan(
    gpu: GpuOpt,
    params: o.ParamsOpt = None,
    model: o.ModelOpt = None,
    global_batch: Annotated[
        int | None,
        typer.Option(
            "--global-batch",
            help="Sequences per optimizer step over all "
            "GPUs; accumulation makes up what micro-batches do not. Default: accumulation 1.",
        ),
    ] = None,
    host_ram: Annotated[
        str | None,
        typer.Option(
            "--host-ram", help="Host RAM per node, e.g. 512GiB; the chosen setup must fit in it. Default: this "
            "machine's RAM, with a note."
        ),
    ] = None,
    margin: Annotated[float, typer.Option("--margin", help="Fraction of GPU memory kept free.")] = FIT_MARGIN,
    stage: StageOpt = None,
    offload: OffloadsOpt = None,
    max_micro_batch: MaxMicroOpt = False,
    max_seq_len: MaxSeqOpt = False,
    min_gpus: MinGpusOpt = False,
    top: Annotated[int, typer.Option("--top", help="Setups shown (1 or more).")] = 10,
    explain: Annotated[bool, typer.Option("--explain", help="Where the chosen setup's memory goes.")] = False,
    write_ds_config: Annotated[
        Path | None,
        typer.Option(
            "--write-ds-config", dir_okay=False, help="Write the chosen setup's ds_config.json here."
        ),
    ] = None,
    write_accelerate_config: Annotated[
        Path | None,
        typer.Option(
            "--write-accelerate-config",
            dir_okay=False,
            help="Write an accelerate config YAML for the chosen setup here.",
        ),
    ] = None,
    write_for: Annotated[
        Builder,
        typer.Option(
            "--write-for",
            help="Who runs the written ds_config: hf-trainer (\"auto\" for the learning rate, weight decay, "
            "betas, eps, clipping and train_batch_size, which TrainingArguments fill; stage 3 then builds under "
            "zero.Init) or script / accelerate (every value fixed, for deepspeed.initialize).",
        ),
    ] = Builder.HF_TRAINER,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    flags: dict | None = None,
) -> None:
    """Find the ZeRO stage, offload, micro-batch, checkpointing and accumulation that fit, fastest first."""
    from zeroest.api import plan_request
    from zeroest.cli.common import fail

    queries = [name for name, on in (("max_micro_batch", max_micro_batch), ("max_seq_len", max_seq_len),
                                     ("min_gpus", min_gpus)) if on]
    try:
        answer = plan_request(o.resolve_model(params, model), flags or {}, gpu=gpu, margin=margin,
                              global_batch=global_batch, host_ram=host_ram, stages=stage,
                              offloads=[d.value for d in offload or ()], queries=queries, top=top, explain=explain,
                              write_ds_config=write_ds_config, write_accelerate_config=write_accelerate_config,
                              write_for=write_for.value, from_params=params is not None)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    _render(answer, as_json)
    if answer.write_error:
        fail(answer.write_error)
    if answer.plan is not None and answer.plan.best is None:
        raise typer.Exit(1)


def _render(answer, as_json: bool) -> None:
    from zeroest.cli import render_plan as r
    from zeroest.cli.common import err, out, warn

    if not as_json:
        for line in answer.notes:
            warn(line)
    if answer.queries:
        if as_json:
            out.print_json(json.dumps(answer.rows))
        else:
            out.print(r.query_table(answer.request, answer.rows, answer.queries))
        return
    result = answer.plan
    if result.best is None:
        if as_json:
            out.print_json(json.dumps({"fits": False, "reason": result.infeasible, "considered": result.considered,
                                       "assumed": answer.notes}))
        else:
            err.print(f"zeroest: {result.infeasible}", markup=False)
        return
    if as_json:
        out.print_json(json.dumps({"fits": True, "considered": result.considered, "fitting": result.fitting,
                                   "evaluations": result.evaluations,
                                   "candidates": [r.candidate_dict(c) for c in answer.shown],
                                   "explain": answer.explain, "written": answer.written,
                                   "assumed": answer.notes}))
        return
    out.print(r.plan_table(replace(result, candidates=answer.shown)))
    out.print(r.summary_line(result, len(answer.shown)), markup=False)
    for line in [*answer.explain, *answer.written]:
        out.print(line, markup=False)

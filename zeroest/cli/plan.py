"""``zeroest plan``: the ZeRO setups that fit a cluster, ranked by a step-time proxy; and capacity queries.

Registered by ``zeroest.cli`` as ``app.command("plan")(plan)``. Parses, builds the request, calls
``zeroest.estimator.plan.plan`` / ``search``, renders. Errors go through ``cli.fail`` (stderr, exit code 2).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from zeroest.cli import options as o
from zeroest.estimator.catalog.fit import FIT_MARGIN
from zeroest.estimator.catalog.gpus import GPU_HELP
from zeroest.estimator.core.vocab import OffloadDevice

GpuOpt = Annotated[str, typer.Option("--gpu", help=f"The GPU: {GPU_HELP}")]
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


def _space(stage, offload, grad_ckpt):
    from zeroest.estimator.plan.plan import SearchSpace

    for s in stage or ():
        if s not in (0, 1, 2, 3):
            raise ValueError(f"--stage must be 0, 1, 2 or 3, got {s}")
    devices = tuple(d.value for d in offload) if offload else ("none", "cpu", "nvme")
    if "none" not in devices:
        devices = ("none", *devices)
    return SearchSpace(
        stages=tuple(sorted(set(stage))) if stage else (0, 1, 2, 3),
        offload_optimizer=devices,
        offload_params=devices,
        grad_ckpt=(False, True) if grad_ckpt is None else (grad_ckpt,),
    )


def _label(stage: int, offload_optimizer: str, offload_params: str, ckpt: bool) -> str:
    """``Z3 opt:cpu par:cpu ckpt``: a setup's ZeRO knobs in one short cell."""
    parts = [f"Z{stage}"]
    if offload_optimizer != "none":
        parts.append(f"opt:{offload_optimizer}")
    if offload_params != "none":
        parts.append(f"par:{offload_params}")
    if ckpt:
        parts.append("ckpt")
    return " ".join(parts)


def _setup_label(setup) -> str:
    z = setup.zero
    return _label(int(z.stage), z.offload_optimizer, z.offload_params, setup.workload.grad_ckpt)


def _plan_table(result) -> Table:
    from zeroest.estimator.units import gib

    req = result.request
    base = req.base
    title = (
        f"{base.model.name}: {base.world_size} x {req.gpu.name} ({gib(req.gpu.memory_bytes):.1f} GiB), "
        f"seq {base.workload.seq_len}{f', global batch {req.global_batch}' if req.global_batch else ''}, "
        f"margin {req.margin:g}"
    )
    table = Table(title=title, title_justify="left")
    for name in ("#", "setup", "micro x accum", "device GiB", "host GiB/node", "step s", "tokens/s"):
        table.add_column(name, justify="left" if name == "setup" else "right", no_wrap=name == "setup")
    for i, cand in enumerate(result.candidates, 1):
        w = cand.setup.workload
        table.add_row(
            str(i),
            _setup_label(cand.setup),
            f"{w.micro_batch} x {w.grad_accum}",
            f"{gib(cand.memory.device_bytes):.1f}",
            f"{gib(cand.memory.cpu_bytes_per_node):.0f}",
            f"{cand.step.total_s:.3g}",
            f"{cand.step.tokens_per_s:,.0f}",
        )
    return table


def _candidate_dict(cand) -> dict:
    from zeroest.estimator.configs.flat import setup_to_dict

    return {
        "setup": setup_to_dict(cand.setup),
        "device_bytes": cand.memory.device_bytes,
        "peak_allocated_bytes": cand.memory.peak_allocated_bytes,
        "peak_reserved_bytes": cand.memory.peak_reserved_bytes,
        "cpu_bytes_per_node": cand.memory.cpu_bytes_per_node,
        "nvme_bytes": cand.memory.nvme_bytes,
        "step_s": cand.step.total_s,
        "compute_s": cand.step.compute_s,
        "comm_s": cand.step.comm_s,
        "offload_s": cand.step.offload_s,
        "tokens_per_step": cand.step.tokens_per_step,
    }


def _queries(request, which: list[str]) -> list[dict]:
    """Each query per (stage, offload, checkpointing) group, at the request's workload."""
    from zeroest.estimator.plan.plan import optimizer_for, zero_groups
    from zeroest.estimator.plan.search import CachedEstimator, max_micro_batch, max_seq_len, min_gpus

    est = CachedEstimator()
    base, gpu, margin = request.base, request.gpu, request.margin
    rows = []
    for zero in zero_groups(base, request.space):
        for ckpt in request.space.grad_ckpt:
            setup = replace(
                base,
                zero=zero,
                optimizer=optimizer_for(base, zero),
                workload=replace(base.workload, grad_ckpt=ckpt),
            )
            row = {
                "stage": int(zero.stage),
                "offload_optimizer": zero.offload_optimizer,
                "offload_params": zero.offload_params,
                "grad_ckpt": ckpt,
            }
            if "max_micro_batch" in which:
                row["max_micro_batch"] = max_micro_batch(setup, gpu.memory_bytes, margin, estimator=est)
            if "max_seq_len" in which:
                row["max_seq_len"] = max_seq_len(setup, gpu.memory_bytes, margin, estimator=est)
            if "min_gpus" in which:
                per_node = base.parallel.gpus_per_node if base.parallel.nodes > 1 else None
                row["min_gpus"] = min_gpus(
                    setup, gpu.memory_bytes, margin, gpus_per_node=per_node, estimator=est
                )
            rows.append(row)
    return rows


def _query_table(request, rows: list[dict], which: list[str]) -> Table:
    from zeroest.estimator.units import gib

    base = request.base
    table = Table(
        title=f"{base.model.name} on {request.gpu.name} ({gib(request.gpu.memory_bytes):.1f} GiB), "
        f"N_d = {base.world_size}, micro-batch {base.workload.micro_batch}, seq {base.workload.seq_len}, "
        f"margin {request.margin:g}",
        title_justify="left",
    )
    for name in ("setup", *(w.replace("_", " ") for w in which)):
        table.add_column(name, justify="left" if name == "setup" else "right", no_wrap=name == "setup")
    for row in rows:
        label = _label(row["stage"], row["offload_optimizer"], row["offload_params"], row["grad_ckpt"])
        cells = [
            ("never" if w == "min_gpus" else "does not fit") if row[w] in (None, 0) else str(row[w])
            for w in which
        ]
        table.add_row(label, *cells)
    if "max_seq_len" in which and any((r["max_seq_len"] or 0) > base.model.max_positions for r in rows):
        table.caption = f"the model was trained with max_position_embeddings = {base.model.max_positions}"
    return table


def _write(best, ds_path: Path | None, acc_path: Path | None) -> list[str]:
    from zeroest.estimator.configs.accelerate_write import accelerate_yaml
    from zeroest.estimator.configs.ds_write import ds_config

    notes = []
    if ds_path is not None:
        ds_path.write_text(json.dumps(ds_config(best.setup), indent=2) + "\n")
        notes.append(f"wrote {ds_path}")
    if acc_path is not None:
        ref = None if ds_path is None else str(ds_path)
        acc_path.write_text(accelerate_yaml(best.setup, ds_config_file=ref))
        notes.append(
            f"wrote {acc_path}"
            + ("" if ref else f" (set your DataLoader's batch size to {best.setup.workload.micro_batch})")
        )
    return notes


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
            "--host-ram", help="Host RAM per node, e.g. 512GiB; offload must fit in it. Default: not checked."
        ),
    ] = None,
    margin: Annotated[float, typer.Option("--margin", help="Fraction of GPU memory kept free.")] = FIT_MARGIN,
    stage: StageOpt = None,
    offload: OffloadsOpt = None,
    max_micro_batch: MaxMicroOpt = False,
    max_seq_len: MaxSeqOpt = False,
    min_gpus: MinGpusOpt = False,
    top: Annotated[int, typer.Option("--top", help="Setups shown.")] = 10,
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
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    flags: dict | None = None,
) -> None:
    """Find the ZeRO stage, offload, micro-batch, checkpointing and accumulation that fit, fastest first."""
    from zeroest.api import build_setup
    from zeroest.cli.common import err, fail, out
    from zeroest.estimator.catalog.gpus import parse_gpu
    from zeroest.estimator.plan.plan import PlanRequest
    from zeroest.estimator.plan.plan import plan as run_plan
    from zeroest.estimator.units import parse_bytes

    which = [
        name
        for name, on in (
            ("max_micro_batch", max_micro_batch),
            ("max_seq_len", max_seq_len),
            ("min_gpus", min_gpus),
        )
        if on
    ]
    try:
        shape = o.resolve_model(params, model)
        flags = dict(flags or {})
        grad_ckpt = flags.pop("grad_ckpt", None)
        card = parse_gpu(gpu)
        base = build_setup(shape, flags, from_params=params is not None, stage=0, gpu_memory_bytes=card.memory_bytes)
        request = PlanRequest(
            base=base,
            gpu=card,
            margin=margin,
            global_batch=global_batch,
            host_ram_bytes=parse_bytes(host_ram) if host_ram else None,
            space=_space(stage, offload, grad_ckpt),
        )
        if which:
            rows = _queries(request, which)
        else:
            result = run_plan(request)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    if which:
        if as_json:
            out.print_json(json.dumps(rows))
        else:
            out.print(_query_table(request, rows, which))
        return
    if result.best is None:
        if as_json:
            out.print_json(
                json.dumps({"fits": False, "reason": result.infeasible, "considered": result.considered})
            )
        else:
            err.print(f"zeroest: {result.infeasible}", markup=False)
        raise typer.Exit(1)
    shown = result.candidates[:top]
    notes = _write(result.best, write_ds_config, write_accelerate_config)
    lines = _explain(result.best.setup) if explain else []
    if as_json:
        out.print_json(
            json.dumps(
                {
                    "fits": True,
                    "considered": result.considered,
                    "fitting": result.fitting,
                    "evaluations": result.evaluations,
                    "candidates": [_candidate_dict(c) for c in shown],
                    "explain": lines,
                    "written": notes,
                }
            )
        )
        return
    out.print(_plan_table(replace(result, candidates=shown)))
    out.print(
        f"{result.considered:,} setups considered ({result.evaluations} estimated), {result.fitting:,} fit; "
        "step s is a proxy for ranking (compute + communication + offload, no overlap)"
    )
    for line in [*lines, *notes]:
        out.print(line, markup=False)


def _explain(setup) -> list[str]:
    from zeroest.estimator.core.estimate import estimate
    from zeroest.estimator.plan.explain import explain

    return explain(estimate(setup))

"""``zeroest validate``: parse the flags, plan the grid, run it with a progress bar, print and write the
summary."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from zeroest.cli.common import err, fail, warn
from zeroest.estimator.core.vocab import Launcher


def _sizes(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        sizes = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ValueError(f"--simulate-world-size {text!r}: expected whole numbers, e.g. 2,4,8") from None
    if any(n < 1 for n in sizes):
        raise ValueError(f"--simulate-world-size {text!r}: world sizes must be 1 or more")
    return sizes


def _emulated(card: str | None, cpu: bool) -> list[str]:
    """The ``--set`` override of ``--emulate-gpu`` (``catalog.gpus.parse_gpu`` reads it)."""
    if card is None:
        return []
    if cpu:
        raise ValueError("--emulate-gpu caps a CUDA device: drop --cpu, or drop --emulate-gpu")
    from zeroest.estimator.catalog.gpus import parse_gpu

    try:
        return [f"gpu_memory_bytes={parse_gpu(card).memory_bytes}"]
    except ValueError as exc:
        raise ValueError(f"--emulate-gpu: {exc}") from None


def _line(index: int, total: int, run, rows: list[dict]) -> str:
    from zeroest.validate.summary import cells, summary_rows

    line = summary_rows(rows)[0]
    c = dict(
        zip(
            ("run", "status", "pred", "alloc", "err", "res", "smi", "step", "tps", "speedup", "alone"),
            cells(line),
            strict=True,
        )
    )
    return (
        f"[{index}/{total}] {c['run']}: {c['status']}; predicted {c['pred']} GiB, "
        f"measured {c['alloc']} GiB "
        f"({c['err']}%), reserved {c['res']} GiB, {c['step']} s/step"
    )


def _table(lines):
    from rich.table import Table

    from zeroest.validate.summary import HEADERS, cells

    table = Table(title="predicted vs measured, per GPU (GiB)")
    for header in HEADERS:
        table.add_column(header, justify="left" if header in ("run", "status") else "right")
    for line in lines:
        table.add_row(*cells(line))
    return table


def validate(
    grid: Annotated[
        list[str] | None, typer.Option("--grid", help="quick, default, any grid in data/grids, or a YAML/JSON file "
                                       "of setups; repeat it to run several grids as one. Default: default.")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="key=value applied to every setup (repeatable), e.g. --set micro_batch=4."
        ),
    ] = None,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Results directory (runs.jsonl, summary.md); re-running with it skips finished runs.",
        ),
    ] = Path("zeroest-validate"),
    launcher: Annotated[
        Launcher, typer.Option("--launcher", help="How ranks are started.")
    ] = Launcher.TORCHRUN,
    cpu: Annotated[
        bool,
        typer.Option(
            "--cpu",
            help="Run gloo ranks on the CPU (memory from live tensor "
            "bytes); for CI and machines without a GPU.",
        ),
    ] = False,
    simulate_world_size: Annotated[
        str | None,
        typer.Option(
            "--simulate-world-size",
            help="Also run every setup as rank 0 of N-rank jobs on a fake process group, e.g. 2,4,8.",
        ),
    ] = None,
    gpus: Annotated[
        int | None,
        typer.Option(
            "--gpus",
            help="Ranks per node of real runs that name no world "
            "size (default: all visible GPUs; 2 with --cpu).",
        ),
    ] = None,
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs",
            help="Runs at once on one GPU where predicted memory fits; "
            "step times count only from runs that had the GPU alone.",
        ),
    ] = 1,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds before a hung run is killed.")] = 600.0,
    steps: Annotated[
        int, typer.Option("--steps", help="Optimizer steps per run (first is warm-up), >= 3.")
    ] = 3,
    redo: Annotated[bool, typer.Option("--redo", help="Run again setups already in OUT/runs.jsonl.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List planned runs and predictions only.")
    ] = False,
    pretrained: Annotated[
        str | None,
        typer.Option(
            "--pretrained", help="Local HF model directory to load weights from (default: random init)."
        ),
    ] = None,
    emulate_gpu: Annotated[
        str | None,
        typer.Option(
            "--emulate-gpu",
            help="Run every setup as on this card (a preset such as 4090 or a size such as 24GB): the process is "
            "capped at its memory and DeepSpeed sees its free memory; sets gpu_memory_bytes of every setup.",
        ),
    ] = None,
    work_dir: Annotated[
        Path | None,
        typer.Option(
            "--work-dir",
            help="Per-run folders (spec, ds_config, logs, rank files); default OUT/work.",
        ),
    ] = None,
    nnodes: Annotated[int, typer.Option("--nnodes", help="Nodes per run; start validate on each.")] = 1,
    node_rank: Annotated[int, typer.Option("--node-rank", help="This node's rank.")] = 0,
    master_addr: Annotated[str, typer.Option("--master-addr", help="Rendezvous host.")] = "127.0.0.1",
    master_port: Annotated[
        int | None,
        typer.Option(
            "--master-port", help="Rendezvous port (default: a free one per run; required with --nnodes > 1)."
        ),
    ] = None,
    hostfile: Annotated[
        str | None, typer.Option("--hostfile", help="DeepSpeed hostfile (--launcher deepspeed).")
    ] = None,
) -> None:
    """Run real DeepSpeed trainings for a grid of setups and compare measured memory with the prediction."""
    from zeroest.estimator.configs import allocator
    from zeroest.validate import grid as grid_mod
    from zeroest.validate import runner
    from zeroest.validate.launch import LaunchOptions, child_env
    from zeroest.validate.summary import markdown, summary_rows

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; validate writes a folder (runs.jsonl, summary.md): give a folder path")
    if work_dir is not None and work_dir.exists() and not work_dir.is_dir():
        fail(f"--work-dir {work_dir} is a file; it holds a folder per run: give a folder path")
    if gpus is not None and gpus < 1:
        fail(f"--gpus must be 1 or more, got {gpus}")
    if hostfile is not None and not Path(hostfile).is_file():
        fail(f"--hostfile {hostfile} is not a file: give the path of the DeepSpeed hostfile")
    missing = runner.missing_packages()
    if missing and not dry_run:
        fail(f"validate runs real DeepSpeed trainings and needs {', '.join(missing)}, which is not installed: "
             "pip install 'zeroest[validate]' (or use --dry-run to list the runs)")
    try:
        launch = LaunchOptions(
            launcher=launcher.value,
            nnodes=nnodes,
            node_rank=node_rank,
            master_addr=master_addr,
            master_port=master_port,
            hostfile=hostfile,
        )
        opts = runner.ValidateOptions(
            out=out,
            launch=launch,
            cpu=cpu,
            gpus=gpus,
            jobs=jobs,
            timeout_s=timeout,
            steps=steps,
            redo=redo,
            pretrained=pretrained,
            work_dir=work_dir,
        )
        conf = allocator.conf_text(os.environ)  # every GPU run gets the setup's expandable_segments written into it
        try:
            allocator.options(conf)
        except ValueError as exc:
            raise ValueError(f"the environment's allocator settings: {exc}") from None
        if (note := allocator.unmodelled_note(conf)) and not cpu:
            warn(f"{note}; kept in every run, so the measured reserve is not what the estimate assumes: unset them "
                 "to compare")
        grid = grid or ["default"]
        loaded = grid_mod.load_grids(grid)
        entries = grid_mod.apply_overrides(loaded, [*(set_ or []), *_emulated(emulate_gpu, cpu)],
                                           _sizes(simulate_world_size))
        devices: list[dict] = []
        if not cpu:
            devices = runner.probe_gpus(child_env(os.environ, cpu=False, capability=None))
            if not devices:
                raise ValueError(
                    "no CUDA GPU is visible (torch.cuda.device_count() is 0): "
                    "pass --cpu to validate on the CPU, or check CUDA_VISIBLE_DEVICES "
                    "and the driver"
                )
        runs = runner.plan(entries, loaded.models, opts, visible_gpus=len(devices))
        todo = runner.prepare_results(runs, opts) if not dry_run else runner.not_done(runs, opts)
    except ValueError as exc:
        fail(str(exc))
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 220)
    where = "CPU (gloo)" if cpu else f"{len(devices)} x {devices[0]['name']}"
    console.print(
        f"{len(runs)} runs planned on {where}, {len(runs) - len(todo)} already in {out}/runs.jsonl, "
        f"{len(todo)} to run"
    )
    if dry_run:
        for run in runs:
            pred = run.prediction or {}
            peak = pred.get("peak_allocated_bytes")
            console.print(
                f"  {run.key} {run.where}: {run.setup['model']} z{run.setup['stage']} "
                f"N={run.setup['world_size']}{' sim' if run.simulated else ''} predicted "
                f"{'-' if peak is None else f'{peak / 2**30:.2f} GiB'}",
                markup=False,
            )
        return
    capability = tuple(devices[0]["capability"]) if devices else None
    capacity = [int(d["memory_bytes"]) for d in devices]
    names = runner.ops_to_build(todo)
    if names:
        console.print(f"building DeepSpeed ops once before the runs: {', '.join(names)} ...")
        start = time.monotonic()
        runner.build_ops(names, opts, dict(os.environ), capability)
        console.print(f"  done in {time.monotonic() - start:.0f} s")
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )
    finished = [0]

    def on_done(run, rows: list[dict]) -> None:
        finished[0] += 1
        progress.console.print(_line(finished[0], len(todo), run, rows), markup=False)
        progress.advance(task)

    with progress:
        task = progress.add_task("validate", total=len(todo))
        try:
            runner.execute(todo, opts, capacity, capability, on_done)
        except KeyboardInterrupt:
            err.print(f"zeroest: interrupted; finished runs are in {out}/runs.jsonl, re-run to resume")
            raise typer.Exit(130) from None
    from zeroest.report.runs import read_rows

    order = {run.key: index for index, run in enumerate(runs)}
    rows = [row for row in read_rows(out / "runs.jsonl") if row.get("run_key") in order]
    lines = summary_rows(sorted(rows, key=lambda row: order[row["run_key"]]))  # grid order
    console.print(_table(lines))
    (out / "summary.md").write_text(
        markdown(lines, title="zeroest validate " + " ".join(f"--grid {g}" for g in grid)), encoding="utf-8"
    )
    console.print(f"wrote {out}/runs.jsonl and {out}/summary.md")

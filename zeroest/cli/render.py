"""Rendering estimates for people: rich tables in GiB (2**30 bytes). Only this layer formats numbers."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from zeroest.estimator.catalog.gpus import Gpu
from zeroest.estimator.core.estimate import Estimate
from zeroest.estimator.units import format_count, gib

ROWS: tuple[tuple[str, str], ...] = (
    ("params", "params (16-bit)"),
    ("master_weights", "master weights (fp32)"),
    ("optimizer_states", "optimizer states"),
    ("grads", "grads"),
    ("buffers", "buffers"),
    ("activations", "activations"),
    ("temporaries", "temporaries"),
)


def _g(n_bytes: int) -> str:
    return f"{gib(n_bytes):.2f}"


def estimates_table(estimates: list[Estimate], gpu: Gpu | None = None) -> Table:
    """One column per stage; rows are components at each stage's peak, then peak, reserved, device, host."""
    first = estimates[0]
    paper = first.setup.mode == "paper"
    title = (f"{first.setup.model.name}: {format_count(first.n_params)} params, N_d = {first.world_size}"
             f"{' (paper mode)' if paper else ''}; GiB per GPU")
    table = Table(title=title, title_justify="left")
    table.add_column("")
    for est in estimates:
        table.add_column(f"stage {est.stage}", justify="right")
    for key, label in ROWS:
        if paper and key in ("master_weights", "buffers", "activations", "temporaries"):
            continue
        table.add_row(label, *(_g(e.components[key]) for e in estimates))
    table.add_section()
    table.add_row("peak allocated", *(_g(e.peak_allocated_bytes) for e in estimates), style="bold")
    if not paper:
        table.add_row("  set in phase", *(e.peak_phase for e in estimates))
        table.add_row("peak reserved", *(_g(e.peak_reserved_bytes) for e in estimates))
        table.add_row("device (nvidia-smi)", *(_g(e.device_bytes) for e in estimates))
        table.add_row("host RAM per node", *(_g(e.cpu_bytes_per_node) for e in estimates))
        if any(e.nvme_bytes for e in estimates):
            table.add_row("NVMe per rank", *(_g(e.nvme_bytes) for e in estimates))
    if gpu is not None:
        table.add_section()
        cells = []
        for est in estimates:
            need = est.device_bytes
            room = gpu.memory_bytes - need
            cells.append(f"[green]fits, {gib(room):.1f} free[/]" if room >= 0
                         else f"[red]no, {gib(-room):.1f} short[/]")
        table.add_row(f"fits {gpu.name} ({gib(gpu.memory_bytes):.1f})", *cells)
    return table


def print_estimates(estimates: list[Estimate], gpu: Gpu | None, console: Console) -> None:
    console.print(estimates_table(estimates, gpu))
    console.print("assumptions:", style="dim")
    for line in estimates[0].assumptions:
        console.print(f"  - {line}", style="dim", highlight=False)
    console.print(f"  - overheads: {estimates[0].overheads.source}", style="dim", highlight=False)

"""Rendering estimates for people: rich tables in GiB (2**30 bytes). Only this layer formats numbers."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from zeroest.estimator.catalog.fit import Fit, margin_text
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


def estimates_table(estimates: list[Estimate], fits: list[Fit] | None = None) -> Table:
    """One column per stage; rows are the components at each stage's peak phase, then the peak, reserved, device
    and host memory, and the fit verdict on the GPU (device memory against the usable part of the card)."""
    first = estimates[0]
    paper = first.setup.mode == "paper"
    title = (f"{first.setup.model.name}: {format_count(first.n_params)} params, N_d = {first.world_size}"
             f"{' (paper mode)' if paper else ''}; GiB per GPU, components at each stage's peak phase")
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
    if fits:
        table.add_section()
        cells = [f"[green]yes, {gib(f.spare_bytes):.1f} GiB spare[/]" if f.fits
                 else f"[red]no, {gib(f.short_bytes):.1f} GiB short[/]" for f in fits]
        first_fit = fits[0]
        table.add_row(f"fits {first_fit.gpu.name}", *cells)
        table.caption = (f"fits: device memory against {gib(first_fit.usable_bytes):.1f} of "
                         f"{gib(first_fit.gpu.memory_bytes):.1f} GiB "
                         f"(margin {margin_text(first_fit.margin)}, --margin)")
    return table


def print_estimates(estimates: list[Estimate], fits: list[Fit], console: Console) -> None:
    console.print(estimates_table(estimates, fits))
    console.print("assumptions:", style="dim")
    for line in estimates[0].assumptions:
        console.print(f"  - {line}", style="dim", highlight=False)
    console.print(f"  - overheads: {estimates[0].overheads.source}", style="dim", highlight=False)

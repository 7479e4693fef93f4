"""Rendering the claims: a table of reductions per N_d and stage, and the reduction-vs-N_d plot."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from zeroest.estimator.core.claims import PAPER_LIMITS, ClaimRow
from zeroest.estimator.units import gib


def print_claims(rows: list[ClaimRow], verdicts: list[str], measured: dict | None, console: Console) -> None:
    table = Table(title="Model states per GPU (GiB) and reduction over stage 0: paper / DeepSpeed",
                  title_justify="left")
    table.add_column("N_d", justify="right")
    for stage in (0, 1, 2, 3):
        table.add_column(f"stage {stage}" + (f" (limit {PAPER_LIMITS[stage]})" if stage in PAPER_LIMITS else ""),
                         justify="right")
    for world in sorted({r.world_size for r in rows}):
        cells = []
        for row in sorted((r for r in rows if r.world_size == world), key=lambda r: r.stage):
            cells.append(f"{gib(row.paper_bytes):.1f} / {gib(row.deepspeed_bytes):.1f}"
                         + ("" if row.stage == 0
                            else f"  ({row.paper_reduction:.2f}x / {row.deepspeed_reduction:.2f}x)"))
        table.add_row(str(world), *cells)
    console.print(table)
    if measured:
        console.print("measured reductions over stage 0 (from runs):")
        for key, value in sorted(measured.items()):
            console.print(f"  {key}: {value:.2f}x")
    for line in verdicts:
        console.print(f"- {line}")


def write_claims_plot(rows: list[ClaimRow], path: str, measured: dict | None = None) -> None:
    """Reduction vs N_d on a log axis, paper (dashed) and DeepSpeed (solid) per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for stage, colour in ((1, "tab:blue"), (2, "tab:orange"), (3, "tab:green")):
        mine = sorted((r for r in rows if r.stage == stage), key=lambda r: r.world_size)
        xs = [r.world_size for r in mine]
        ax.plot(xs, [r.paper_reduction for r in mine], "--", color=colour, label=f"stage {stage} paper")
        ax.plot(xs, [r.deepspeed_reduction for r in mine], "-", color=colour, label=f"stage {stage} DeepSpeed")
    for key, value in (measured or {}).items():
        stage, world = key.split("@")
        ax.plot([int(world)], [value], "o", color="black")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("N_d (data-parallel GPUs)")
    ax.set_ylabel("model-state reduction over stage 0")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

"""``zeroest report --plots DIR``: the accuracy plots, each as PNG and SVG (matplotlib, Agg backend).

* ``predicted_vs_measured``: predicted against measured peak allocated, reserved and device memory per rank,
  with y = x and a +-5% band, coloured by ZeRO stage;
* ``components``: predicted components of each stage stacked, beside the measured peak, for the shapes
  measured at most stages;
* ``reductions``: measured and predicted reduction over stage 0 against N_d, on the paper's and DeepSpeed's
  curves;
* ``error_histogram``: signed relative errors of the three quantities.
"""

from __future__ import annotations

from pathlib import Path

from zeroest.estimator.units import GiB
from zeroest.report.analysis import BASIS_TITLES, Analysis
from zeroest.report.fit import QUANTITIES
from zeroest.report.join import Record
from zeroest.report.load import shape_key
from zeroest.report.tables import claim_points, run_label

STAGE_COLOURS = {0: "#4c72b0", 1: "#dd8452", 2: "#55a868", 3: "#c44e52"}
COMPONENT_COLOURS = {"params": "#4c72b0", "master_weights": "#64b5cd", "optimizer_states": "#8172b3",
                     "grads": "#55a868", "buffers": "#ccb974", "activations": "#dd8452",
                     "temporaries": "#c44e52"}
TITLES = {"peak_allocated": "peak allocated", "peak_reserved": "peak reserved",
          "device": "device (nvidia-smi)"}
BAND = 0.05


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "zeroest"  # the same SVG for the same data: docs diff cleanly
    import matplotlib.pyplot as plt

    return plt


def _save(fig, stem: Path) -> list[Path]:
    paths = []
    for suffix in (".png", ".svg"):
        path = stem.with_suffix(suffix)
        metadata = {"Date": None} if suffix == ".svg" else {}
        fig.savefig(path, dpi=120, bbox_inches="tight", metadata=metadata)
        paths.append(path)
    _pyplot().close(fig)
    return paths


def _plain():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:g}")


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def predicted_vs_measured(a: Analysis, basis: str, stem: Path) -> list[Path]:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(QUANTITIES), figsize=(5 * len(QUANTITIES), 4.6))
    for ax, q in zip(axes, QUANTITIES, strict=True):
        points = [(r.measured[q] / GiB, a.predictions[basis][r.key].quantities[q] / GiB, int(r.setup.stage))
                  for r in a.compared if r.measured[q] and r.key in a.predictions[basis]]
        if not points:
            _empty(ax, f"no measured {TITLES[q]}")
            continue
        top = max(max(m, p) for m, p, _ in points) * 1.08
        low = min(min(m, p) for m, p, _ in points) / 1.08
        line = [0.0] + [low * (top / low) ** (i / 100) for i in range(101)]
        ax.plot(line, line, color="black", lw=1, label="y = x")
        ax.fill_between(line, [v * (1 - BAND) for v in line], [v * (1 + BAND) for v in line], color="grey",
                        alpha=0.2, label=f"+-{BAND:.0%}")
        for stage in sorted({s for *_, s in points}):
            xs = [m for m, _, s in points if s == stage]
            ys = [p for _, p, s in points if s == stage]
            ax.scatter(xs, ys, s=22, color=STAGE_COLOURS.get(stage, "black"), label=f"stage {stage}",
                       zorder=3)
        if top / low > 20:  # sizes over decades: log axes keep the small runs readable
            ax.set(xscale="log", yscale="log", xlim=(low, top), ylim=(low, top))
        else:
            ax.set(xlim=(0, top), ylim=(0, top))
        ax.set(xlabel="measured GiB", ylabel="predicted GiB", title=TITLES[q])
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Predicted vs measured per rank ({BASIS_TITLES[basis]})")
    return _save(fig, stem)


def _showcase(a: Analysis, limit: int = 4) -> list[list[Record]]:
    """Up to ``limit`` (shape, N_d) groups measured at the most stages: one record per stage, real
    preferred."""
    groups: dict[tuple, dict[int, Record]] = {}
    for r in a.compared:
        slot = groups.setdefault((shape_key(r.row.data["setup"]), r.setup.world_size), {})
        stage = int(r.setup.stage)
        if stage not in slot or (slot[stage].simulated and not r.simulated):
            slot[stage] = r
    ranked = sorted(groups.items(), key=lambda kv: (-len(kv[1]), -kv[0][1], str(kv[0][0])))
    return [[slot[s] for s in sorted(slot)] for _, slot in ranked[:limit]]


def components(a: Analysis, basis: str, stem: Path) -> list[Path]:
    plt = _pyplot()
    shows = _showcase(a)
    fig, axes = plt.subplots(1, max(1, len(shows)), figsize=(4.2 * max(1, len(shows)), 4.8), squeeze=False)
    for ax, group in zip(axes[0], shows or [[]], strict=True):
        if not group:
            _empty(ax, "no measured runs")
            continue
        for i, r in enumerate(group):
            pred = a.predictions[basis].get(r.key) or r.current
            bottom = 0.0
            for name, colour in COMPONENT_COLOURS.items():
                value = pred.components.get(name, 0) / GiB
                ax.bar(i - 0.2, value, 0.4, bottom=bottom, color=colour, label=name if i == 0 else None)
                bottom += value
            ax.bar(i + 0.2, (r.measured["peak_allocated"] or 0) / GiB, 0.4, color="black",
                   label="measured peak allocated" if i == 0 else None)
            if r.measured["peak_reserved"]:
                ax.plot(i + 0.2, r.measured["peak_reserved"] / GiB, marker="_", markersize=18, color="red",
                        label="measured peak reserved" if i == 0 else None)
        ax.set_xticks(range(len(group)), [f"z{int(r.setup.stage)}" for r in group])
        title = f"{run_label(group[0]).split(' z')[0]} N_d={group[0].setup.world_size}"
        ax.set(ylabel="GiB per GPU", title=title)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, bbox_to_anchor=(0.5, -0.08))
    fig.suptitle(f"Predicted components (left) and measured peak (right) by stage ({BASIS_TITLES[basis]})")
    return _save(fig, stem)


def reductions(a: Analysis, stem: Path) -> list[Path]:
    from zeroest.estimator.core.claims import claims_table

    plt = _pyplot()
    points = claim_points(a)
    models = sorted({p.model for p in points}, key=lambda m: (-sum(p.model == m for p in points), m))[:3]
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(5.5 * max(1, len(models)), 4.6), squeeze=False)
    for ax, model in zip(axes[0], models or [None], strict=True):
        if model is None:
            _empty(ax, "no stage measured beside stage 0 at the same N_d")
            continue
        mine = [p for p in points if p.model == model]
        shape = next(r.setup.model for r in a.records if r.model == model)
        top = max(64, 2 * max(p.world_size for p in mine))
        worlds = tuple(2**i for i in range(top.bit_length()) if 2**i <= top)
        table = claims_table(shape, worlds)
        for stage in (1, 2, 3):
            colour = STAGE_COLOURS[stage]
            rows = [r for r in table if r.stage == stage]
            ax.plot([r.world_size for r in rows], [r.paper_reduction for r in rows], color=colour, lw=1,
                    ls=":", label=f"paper z{stage}")
            ax.plot([r.world_size for r in rows], [r.deepspeed_reduction for r in rows], color=colour, lw=1,
                    ls="--", label=f"DeepSpeed states z{stage}")
            got = [p for p in mine if p.stage == stage]
            ax.scatter([p.world_size for p in got], [p.measured for p in got], color=colour, s=36, zorder=3,
                       label=f"measured z{stage}" if got else None)
            ax.scatter([p.world_size for p in got], [p.predicted for p in got], facecolors="none",
                       edgecolors=colour, s=80, zorder=3, label=f"predicted z{stage}" if got else None)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(_plain())
        ax.set(xlabel="N_d", ylabel="reduction over stage 0", title=model)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle("Per-GPU memory reduction over stage 0: measured peak (dots), predicted peak (rings), "
                 "model-state curves")
    return _save(fig, stem)


def error_histogram(a: Analysis, basis: str, stem: Path) -> list[Path]:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for q in QUANTITIES:
        errs = [100 * e for r in a.compared if (e := a.error(r, basis, q)) is not None]
        if errs:
            low, high = min(-6.0, min(errs)), max(6.0, max(errs))
            width = max(0.25, (high - low) / 60)
            edges = [low + i * width for i in range(int((high - low) / width) + 2)]
            ax.hist(errs, bins=edges, alpha=0.5, label=f"{TITLES[q]} (n={len(errs)})")
            drawn = True
    if not drawn:
        _empty(ax, "no compared rows")
    else:
        for x in (-100 * BAND, 100 * BAND):
            ax.axvline(x, color="grey", ls="--", lw=1)
        ax.axvline(0, color="black", lw=1)
        ax.set(xlabel="(predicted - measured) / measured, %", ylabel="ranks")
        ax.legend(fontsize=8)
    ax.set_title(f"Prediction errors ({BASIS_TITLES[basis]}); left of 0: under-predicted")
    return _save(fig, stem)


def write_plots(a: Analysis, directory: Path, basis: str | None = None) -> list[Path]:
    """Write every plot as PNG and SVG under ``directory`` (created); returns the files written."""
    basis = basis or a.primary
    directory.mkdir(parents=True, exist_ok=True)
    return [
        *predicted_vs_measured(a, basis, directory / "predicted_vs_measured"),
        *components(a, basis, directory / "components"),
        *reductions(a, directory / "reductions"),
        *error_histogram(a, basis, directory / "error_histogram"),
    ]

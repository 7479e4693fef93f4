"""Rendering ``zeroest plan``'s answers: the ranked setups, the capacity queries, and their JSON."""

from __future__ import annotations

from rich.table import Table


def label(stage: int, offload_optimizer: str, offload_params: str, ckpt: bool) -> str:
    """``Z3 opt:cpu par:cpu ckpt``: a setup's ZeRO knobs in one short cell."""
    parts = [f"Z{stage}"]
    if offload_optimizer != "none":
        parts.append(f"opt:{offload_optimizer}")
    if offload_params != "none":
        parts.append(f"par:{offload_params}")
    if ckpt:
        parts.append("ckpt")
    return " ".join(parts)


def setup_label(setup) -> str:
    z = setup.zero
    return label(int(z.stage), z.offload_optimizer, z.offload_params, setup.workload.grad_ckpt)


def seconds(value: float) -> str:
    """Three significant digits with their zeros (1.00, 0.650, 12.3), whole seconds from 100 on (1,234), so that a
    column of step times lines up: ``:.3g`` writes 1.00 as 1 and 1234 as 1.23e+03."""
    return f"{value:,.0f}" if value >= 100 else f"{value:#.3g}".rstrip(".")


def plan_table(result) -> Table:
    from zeroest.estimator.catalog.fit import margin_text
    from zeroest.estimator.units import gib

    req = result.request
    base = req.base
    title = (
        f"{base.model.name}: {base.world_size} x {req.gpu.name} ({gib(req.gpu.memory_bytes):.1f} GiB), "
        f"seq {base.workload.seq_len}{f', global batch {req.global_batch}' if req.global_batch else ''}, "
        f"margin {margin_text(req.margin)}"
    )
    table = Table(title=title, title_justify="left")
    for name in ("#", "setup", "micro x accum", "device GiB", "host GiB/node", "step s", "tokens/s"):
        table.add_column(name, justify="left" if name == "setup" else "right", no_wrap=name == "setup")
    for i, cand in enumerate(result.candidates, 1):
        w = cand.setup.workload
        table.add_row(
            str(i),
            setup_label(cand.setup),
            f"{w.micro_batch} x {w.grad_accum}",
            f"{gib(cand.memory.device_bytes):.1f}",
            f"{gib(cand.memory.cpu_bytes_per_node):.0f}",
            seconds(cand.step.total_s),
            f"{cand.step.tokens_per_s:,.0f}",
        )
    return table


def candidate_dict(cand) -> dict:
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


def query_table(request, rows: list[dict], which: list[str]) -> Table:
    from zeroest.estimator.catalog.fit import margin_text
    from zeroest.estimator.units import gib

    base = request.base
    table = Table(
        title=f"{base.model.name} on {request.gpu.name} ({gib(request.gpu.memory_bytes):.1f} GiB), "
        f"N_d = {base.world_size}, micro-batch {base.workload.micro_batch}, seq {base.workload.seq_len}, "
        f"margin {margin_text(request.margin)}",
        title_justify="left",
    )
    for name in ("setup", *(w.replace("_", " ") for w in which)):
        table.add_column(name, justify="left" if name == "setup" else "right", no_wrap=name == "setup")
    for row in rows:
        cell = label(row["stage"], row["offload_optimizer"], row["offload_params"], row["grad_ckpt"])
        cells = [
            ("never" if w == "min_gpus" else "does not fit") if row[w] in (None, 0) else str(row[w])
            for w in which
        ]
        table.add_row(cell, *cells)
    if "max_seq_len" in which and any((r["max_seq_len"] or 0) > base.model.max_positions for r in rows):
        table.caption = f"the model was trained with max_position_embeddings = {base.model.max_positions}"
    return table




def summary_line(result, shown: int) -> str:
    """How many setups were considered and fit, and why fewer are shown: one row per ZeRO group, then --top."""
    groups = len(result.candidates)
    cut = f", the first {shown} shown (--top)" if shown < groups else ""
    return (f"{result.considered:,} setups considered ({result.evaluations} estimated), {result.fitting:,} fit; "
            f"one row per stage/offload/checkpointing group that fits (its fastest micro-batch): {groups} rows"
            f"{cut}. step s is a proxy for ranking (compute + communication + offload, no overlap)")

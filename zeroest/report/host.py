"""Host RAM: predicted per rank (``Estimate.host``, ``estimator.core.host``) against the RSS each measured rank
recorded (validate/measure.py: ``rss_bytes`` per phase, psutil; ``host_rss_bytes`` the largest from ``init`` on).

The measured RSS after ``deepspeed.initialize`` is compared with ``held`` = process + pinned + pageable: the
full-model copy a rank loads is gone by then (its RSS shows in the ``build`` phase, listed beside it). A simulated
row is one process, rank 0 of N on a fake process group: it measures one rank (without a real communicator's
host memory, which the prediction leaves out for it too); per node is the prediction times the ranks per node,
which only a real multi-rank run could measure. Page-locked bytes are part of the RSS; rows measured since
validate/measure.py reads ``torch.cuda.host_memory_stats`` record them apart (``host_pinned_bytes``), shown
beside the predicted pinned term; older rows compare them only inside the RSS.
Runs that ran out of memory stop before the optimizer's states exist and are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from zeroest.estimator.units import GiB
from zeroest.report.errors import ErrorStats, error_stats, relative_error

TERMS = ("process", "pinned", "pageable", "model_load")


@dataclass(frozen=True, kw_only=True)
class HostRow:
    """One measured rank's host RAM beside the prediction."""

    label: str
    simulated: bool
    ranks_per_node: int
    terms: dict[str, int]
    """Predicted bytes of one rank by term (``HostTerms.components``)."""
    measured_rss_bytes: int
    build_rss_bytes: int | None
    measured_pinned_bytes: int | None = None
    """Page-locked host memory the row measured (``host_pinned_bytes``), None for rows from before it."""

    @property
    def offload(self) -> bool:
        """The rank holds offloaded states on the host."""
        return self.terms.get("pinned", 0) + self.terms.get("pageable", 0) > 0

    @property
    def held_bytes(self) -> int:
        return sum(self.terms.get(t, 0) for t in TERMS if t != "model_load")

    @property
    def per_node_bytes(self) -> int:
        return self.ranks_per_node * sum(self.terms.values())

    @property
    def error(self) -> float:
        return relative_error(self.held_bytes, self.measured_rss_bytes)


def host_rows(records: Sequence) -> list[HostRow]:
    """Rows of finished ranks (``report.join.Record``) with a measured RSS and a current host prediction."""
    from zeroest.report.tables import run_label

    out = []
    for r in records:
        measured = r.row.data["measured"]
        rss = measured.get("host_rss_bytes")
        if r.oom is not None or not rss or not r.current.host:
            continue
        build = ((measured.get("phases") or {}).get("build") or {}).get("rss_bytes")
        pinned = measured.get("host_pinned_bytes")
        out.append(HostRow(label=run_label(r), simulated=r.simulated, ranks_per_node=r.setup.parallel.gpus_per_node,
                           terms=dict(r.current.host), measured_rss_bytes=int(rss),
                           build_rss_bytes=int(build) if build else None,
                           measured_pinned_bytes=int(pinned) if pinned is not None else None))
    return out


def host_stats(rows: Sequence[HostRow], offload: bool | None = None) -> ErrorStats:
    """Errors of ``held`` against the measured RSS; ``offload`` True/False keeps rows with/without host states."""
    keep = [h for h in rows if offload is None or h.offload == offload]
    return error_stats(h.error for h in keep)


def host_section(rows: list[HostRow], pct) -> list[str]:
    """Markdown: the error statistics, then one line per rank with offloaded states (GiB)."""
    if not rows:
        return []
    lines = ["## Host RAM", "", "Measured: the largest RSS of the rank from `init` on. Predicted: process + pinned "
             "+ pageable (`Estimate.host`); the load copy (the 16-bit model every rank loads first) is gone by "
             "then and shows in the build phase. Simulated rows are one process, rank 0 of N: one rank measured, "
             "per node predicted only.", "",
             "| rows | n | median abs | max abs | mean | under-predicted |", "|---|---|---|---|---|---|"]
    for name, keep in (("all", None), ("with offload", True), ("without offload", False)):
        s = host_stats(rows, keep)
        lines.append(f"| {name} | {s.n} | {pct(s.median_abs_error)} | {pct(s.max_abs_error)} | "
                     f"{pct(s.mean_error, signed=True)} | {pct(s.under_prediction_rate)} |")
    lines += ["", "| run | process | pinned | measured pinned | pageable | predicted held | measured RSS | error | "
              "load copy | build RSS | per node |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for h in rows:
        if not h.offload:
            continue
        cells = [h.terms["process"], h.terms["pinned"], h.measured_pinned_bytes, h.terms["pageable"], h.held_bytes,
                 h.measured_rss_bytes]
        build = "-" if h.build_rss_bytes is None else f"{h.build_rss_bytes / GiB:.2f}"
        lines.append(f"| {h.label} | " + " | ".join("-" if c is None else f"{c / GiB:.2f}" for c in cells)
                     + f" | {pct(h.error, signed=True)} | {h.terms['model_load'] / GiB:.2f} | {build} | "
                     f"{h.per_node_bytes / GiB:.2f} |")
    return lines

"""The comparison table of a validation: per run, memory per GPU predicted vs measured, step time, tokens/s,
speedup.

One line per run (the rank with the largest measured peak stands for it). Memory columns: predicted peak
allocated, measured peak allocated, measured peak reserved, NVML (nvidia-smi) bytes; error % is (predicted -
measured) / measured of peak allocated. Speedup is tokens/s over the stage-0 run of the same model and shape
(model, world size, micro-batch, sequence length, accumulation, checkpointing, dtype, simulated or not).
"""

from __future__ import annotations

from dataclasses import dataclass

from zeroest.estimator.units import GiB

from zeroest.report.runs import run_label

_SHAPE_KEYS = ("model", "world_size", "micro_batch", "seq_len", "grad_accum", "grad_ckpt", "dtype")


@dataclass(frozen=True, kw_only=True)
class SummaryRow:
    """One run in the comparison table (bytes as ints, None where not measured or not predicted)."""

    label: str
    status: str
    predicted_bytes: int | None
    allocated_bytes: int | None
    reserved_bytes: int | None
    nvml_bytes: int | None
    step_time_s: float | None
    tokens_per_s: float | None
    exclusive: bool
    simulated: bool
    speedup: float | None = None

    @property
    def error_pct(self) -> float | None:
        """(predicted - measured) / measured of peak allocated, in percent; None for a run that did not finish
        (an out-of-memory run's peak is where it died, not what it needed)."""
        if self.status != "ok" or self.predicted_bytes is None or not self.allocated_bytes:
            return None
        return 100.0 * (self.predicted_bytes - self.allocated_bytes) / self.allocated_bytes


def _worst_rank(rows: list[dict]) -> dict:
    def peak(row: dict) -> int:
        return int((row.get("measured") or {}).get("peak_allocated_bytes") or 0)

    return max(rows, key=peak)


def summary_rows(rows: list[dict]) -> list[SummaryRow]:
    """The table's rows, in the order runs first appear in ``rows``."""
    by_run: dict[str, list[dict]] = {}
    for row in rows:
        by_run.setdefault(row["run_key"], []).append(row)
    table: list[tuple[dict, SummaryRow]] = []
    for group in by_run.values():
        row = _worst_rank(group)
        measured = row.get("measured") or {}
        prediction = row.get("prediction") or {}
        status = "oom@" + str(measured["oom"]) if measured.get("oom") else row.get("status", "?")
        table.append(
            (
                row,
                SummaryRow(
                    label=run_label(row["setup"], row["simulated"]),
                    status=status,
                    predicted_bytes=prediction.get("peak_allocated_bytes"),
                    allocated_bytes=measured.get("peak_allocated_bytes"),
                    reserved_bytes=measured.get("peak_reserved_bytes"),
                    nvml_bytes=measured.get("device_bytes"),
                    step_time_s=measured.get("step_time_s"),
                    tokens_per_s=measured.get("tokens_per_s"),
                    exclusive=bool(row.get("exclusive")),
                    simulated=bool(row.get("simulated")),
                ),
            )
        )
    base: dict[tuple, float] = {}
    for row, line in table:
        if int(row["setup"]["stage"]) == 0 and line.tokens_per_s:
            shape = (*(row["setup"].get(k) for k in _SHAPE_KEYS), line.simulated)
            base.setdefault(shape, line.tokens_per_s)
    out = []
    for row, line in table:
        shape = (*(row["setup"].get(k) for k in _SHAPE_KEYS), line.simulated)
        speedup = line.tokens_per_s / base[shape] if line.tokens_per_s and shape in base else None
        out.append(SummaryRow(**{**line.__dict__, "speedup": speedup}))
    return out


HEADERS = (
    "run",
    "status",
    "predicted GiB",
    "allocated GiB",
    "error %",
    "reserved GiB",
    "nvidia-smi GiB",
    "step s",
    "tokens/s",
    "speedup vs z0",
    "alone",
)


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def cells(line: SummaryRow) -> list[str]:
    """The table cells of one run, as text."""
    return [
        line.label,
        line.status,
        _gib(line.predicted_bytes),
        _gib(line.allocated_bytes),
        "-" if line.error_pct is None else f"{line.error_pct:+.1f}",
        _gib(line.reserved_bytes),
        _gib(line.nvml_bytes),
        "-" if line.step_time_s is None else f"{line.step_time_s:.3f}",
        "-" if line.tokens_per_s is None else f"{line.tokens_per_s:,.0f}",
        "-" if line.speedup is None else f"{line.speedup:.2f}x",
        "yes" if line.exclusive else "no",
    ]


def markdown(lines: list[SummaryRow], title: str = "zeroest validate") -> str:
    """OUT/summary.md: the table, with what its columns mean."""
    out = [
        f"# {title}",
        "",
        "Memory per GPU (GiB = 2**30 bytes), the rank with the largest peak. error % = "
        "(predicted - measured) / measured peak allocated. Step times and speedups are trustworthy only "
        "where 'alone' is yes (the run had its GPU to itself); simulated runs skip all communication.",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
    ]
    out += ["| " + " | ".join(cells(line)) + " |" for line in lines]
    errors = [abs(line.error_pct) for line in lines if line.error_pct is not None]
    if errors:
        out += [
            "",
            f"{len(errors)} runs compared: mean |error| {sum(errors) / len(errors):.1f}%, "
            f"max {max(errors):.1f}%.",
        ]
    return "\n".join(out) + "\n"

"""The fit verdict against what happened: on each row's card (an emulated one from ``setup.gpu_memory_bytes``,
else the row's GPU), did the current estimator say "fits" at the printed margin, and did the run finish or run
out of memory? The prediction stored at run time is shown beside it (what ``validate`` printed then).

Two measured outcomes are compared with the verdict, because the verdict is a claim about the margin ("fits
keeping ``margin`` of the card free", ``catalog.fit.usable_bytes``):

* ran / OOM: "fits" is right when the run finished, "does not fit" when it ran out of memory;
* at the margin: a run that finished with its measured device memory (NVML, per process) above the usable
  budget did not keep the margin free either, so "does not fit" is right for it; a "fits" for such a run is
  counted wrong (optimistic), although it did not run out of memory.

The targets (issue 12): right on >= 95% of emulated rows, and no "fits" for a run that OOMed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from zeroest.estimator.catalog.fit import FIT_MARGIN, margin_text, usable_bytes
from zeroest.report.load import RunRow, is_oom

OUTCOMES = ("fits, ok", "fits, OOM", "does not fit, ok", "does not fit, OOM")


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """One run's predicted verdict (current estimator, and the one stored at run time) and measured outcome."""

    run_key: str
    label: str
    """The run at a glance (``report.tables.run_label``), or the model name."""
    model: str
    stage: int
    card_bytes: int
    usable_bytes: int
    """``floor((1 - margin) * card_bytes)``."""
    emulated: bool
    predicted_device_bytes: int
    """The current estimator's ``Estimate.device_bytes``."""
    stored_device_bytes: int | None
    """``device_bytes`` of the prediction written at run time (None when the row has none)."""
    measured_device_bytes: int | None
    """The row's measured device memory (NVML, per process), None when not read."""
    oom: bool
    expandable: bool = False
    """The run's allocator mapped expandable segments (``setup.expandable_segments``)."""

    @property
    def fits(self) -> bool:
        """Predicted device memory <= the card's usable memory at the margin."""
        return self.predicted_device_bytes <= self.usable_bytes

    @property
    def stored_fits(self) -> bool | None:
        return None if self.stored_device_bytes is None else self.stored_device_bytes <= self.usable_bytes

    @property
    def right(self) -> bool:
        """Against ran / OOM."""
        return self.fits != self.oom

    @property
    def stored_right(self) -> bool | None:
        return None if self.stored_fits is None else self.stored_fits != self.oom

    @property
    def over_budget(self) -> bool:
        """Finished, but used more device memory than the usable budget (ran inside the margin)."""
        return not self.oom and (self.measured_device_bytes or 0) > self.usable_bytes

    @property
    def right_at_margin(self) -> bool:
        """Against the outcome at the margin: "fits" is right only for a run that finished within the budget."""
        return self.fits == (not self.oom and not self.over_budget)

    @property
    def outcome(self) -> str:
        return OUTCOMES[2 * (not self.fits) + self.oom]


def verdict_from_row(row: RunRow, predicted_device_bytes: int | None, margin: float = FIT_MARGIN,
                     label: str | None = None) -> Verdict | None:
    """The verdict of one row given the current prediction; None for a row that is not rank 0, has no card,
    no prediction, or neither finished nor ran out of memory."""
    data = row.data
    setup = data["setup"]
    card = setup.get("gpu_memory_bytes") or (data.get("gpu") or {}).get("memory_bytes")
    if data["rank"] != 0 or not card or not predicted_device_bytes or data["status"] not in ("ok", "oom"):
        return None
    stored = (data.get("prediction") or {}).get("device_bytes")
    measured = (data.get("measured") or {}).get("device_bytes")
    return Verdict(run_key=row.run_key, label=label or str(setup["model"]), model=str(setup["model"]),
                   stage=int(setup["stage"]),
                   card_bytes=int(card), usable_bytes=usable_bytes(int(card), margin),
                   emulated=bool(setup.get("gpu_memory_bytes")), predicted_device_bytes=int(predicted_device_bytes),
                   stored_device_bytes=int(stored) if stored else None,
                   measured_device_bytes=int(measured) if measured else None, oom=is_oom(row),
                   expandable=bool(setup.get("expandable_segments")))


def verdicts(records: Iterable, margin: float = FIT_MARGIN) -> list[Verdict]:
    """One verdict per run from ``report.join.Record``s (rank 0's), with the current estimator's device bytes."""
    from zeroest.report.tables import run_label

    out = (verdict_from_row(r.row, r.current.quantities["device"], margin, run_label(r)) for r in records)
    return [v for v in out if v is not None]


def _rate(right: int, n: int) -> str:
    return f"{right} of {n} ({right / n:.1%})" if n else "0 of 0"


def verdict_table(items: list[Verdict], margin: float = FIT_MARGIN) -> list[str]:
    """Markdown lines: the 2 x 2 counts (current estimator), then the share right on emulated rows against ran /
    OOM and at the margin, for the current estimator and the prediction stored at run time."""
    counts = {name: sum(v.outcome == name for v in items) for name in OUTCOMES}
    over = sum(v.over_budget and not v.fits for v in items)
    lines = [f"fit verdict at margin {margin_text(margin)} (current estimator's device memory vs usable card memory), "
             f"{len(items)} runs:", "", "| predicted | measured ok | measured OOM |", "| --- | ---: | ---: |",
             f"| fits | {counts['fits, ok']} | {counts['fits, OOM']} |",
             f"| does not fit | {counts['does not fit, ok']} ({over} over the usable budget) "
             f"| {counts['does not fit, OOM']} |", ""]
    emulated = [v for v in items if v.emulated]
    if emulated:
        n = len(emulated)
        stored = [v for v in emulated if v.stored_right is not None]
        lines.append(
            f"emulated rows, right against ran/OOM: current {_rate(sum(v.right for v in emulated), n)}, "
            f"stored at run time {_rate(sum(bool(v.stored_right) for v in stored), len(stored))}; "
            f"at the margin (a run over the usable budget did not fit): current "
            f"{_rate(sum(v.right_at_margin for v in emulated), n)}; 'fits' but OOM: current "
            f"{sum(v.fits and v.oom for v in emulated)}, stored {sum(bool(v.stored_fits) and v.oom for v in stored)}; "
            f"'fits' but over the budget: {sum(v.fits and v.over_budget for v in emulated)}")
        split = [(name, [v for v in emulated if v.expandable == on]) for name, on in
                 (("torch's default allocator", False), ("expandable segments", True))]
        if all(group for _, group in split):
            lines.append("at the margin by allocator: " + "; ".join(
                f"{name} {_rate(sum(v.right_at_margin for v in group), len(group))}, 'fits' but over the budget "
                f"{sum(v.fits and v.over_budget for v in group)}" for name, group in split))
    return lines


def verdict_rows(items: list[Verdict]) -> list[list[str]]:
    """One table row per run: the run, card, usable, stored and current prediction and verdict, measured
    device, the current device error (finished runs: an OOM run's device reading stops short), outcome, right
    (GiB, 2**30 bytes)."""
    def gib(n: int | None) -> str:
        return "-" if n is None else f"{n / 2**30:.2f}"

    def said(fits: bool | None) -> str:
        return "-" if fits is None else "fits" if fits else "does not fit"

    rows = []
    for v in items:
        outcome = "OOM" if v.oom else "ok, over budget" if v.over_budget else "ok"
        mark = "yes" if v.right_at_margin else "**no**" if v.fits else "no (conservative)"
        error = ("-" if not v.measured_device_bytes or v.oom else
                 f"{100 * (v.predicted_device_bytes - v.measured_device_bytes) / v.measured_device_bytes:+.1f}%")
        rows.append([v.label, gib(v.card_bytes), gib(v.usable_bytes),
                     gib(v.stored_device_bytes), said(v.stored_fits), gib(v.predicted_device_bytes), said(v.fits),
                     gib(v.measured_device_bytes), error, outcome, mark])
    return rows


VERDICT_HEADERS = ["run", "card GiB", "usable GiB", "stored device GiB", "stored verdict",
                   "current device GiB", "current verdict", "measured device GiB", "device error", "outcome",
                   "right at the margin"]

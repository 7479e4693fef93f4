"""The fit verdict against what happened: on each row's card (an emulated one from ``setup.gpu_memory_bytes``,
else the row's GPU), did the prediction say "fits" at the printed margin, and did the run finish or run out of
memory? The targets (issue 12): right on >= 95% of emulated rows, and no "fits" for a run that OOMed."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from zeroest.estimator.catalog.fit import FIT_MARGIN, usable_bytes
from zeroest.report.load import RunRow, is_oom

OUTCOMES = ("fits, ok", "fits, OOM", "does not fit, ok", "does not fit, OOM")


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """One run's predicted verdict and measured outcome."""

    run_key: str
    model: str
    stage: int
    card_bytes: int
    emulated: bool
    predicted_device_bytes: int
    fits: bool
    """Predicted device memory <= the card's usable memory at the margin (``catalog.fit.usable_bytes``)."""
    oom: bool

    @property
    def right(self) -> bool:
        return self.fits != self.oom

    @property
    def outcome(self) -> str:
        return OUTCOMES[2 * (not self.fits) + self.oom]


def verdicts(rows: Iterable[RunRow], margin: float = FIT_MARGIN) -> list[Verdict]:
    """One verdict per run (rank 0's row) with a prediction, a card and an ok/oom status."""
    out = []
    for row in rows:
        data = row.data
        pred, setup = data.get("prediction") or {}, data["setup"]
        card = setup.get("gpu_memory_bytes") or (data.get("gpu") or {}).get("memory_bytes")
        if data["rank"] != 0 or not card or not pred.get("device_bytes") or data["status"] not in ("ok", "oom"):
            continue
        out.append(Verdict(run_key=row.run_key, model=str(setup["model"]), stage=int(setup["stage"]),
                           card_bytes=int(card), emulated=bool(setup.get("gpu_memory_bytes")),
                           predicted_device_bytes=int(pred["device_bytes"]),
                           fits=pred["device_bytes"] <= usable_bytes(int(card), margin), oom=is_oom(row)))
    return out


def verdict_table(items: list[Verdict], margin: float = FIT_MARGIN) -> list[str]:
    """Markdown lines: the 2 x 2 counts and the share right (emulated rows and all)."""
    counts = {name: sum(v.outcome == name for v in items) for name in OUTCOMES}
    emulated = [v for v in items if v.emulated]
    right = sum(v.right for v in emulated)
    lines = [f"fit verdict at margin {margin:.0%} (predicted device memory vs usable card memory), "
             f"{len(items)} runs:", "", "| predicted | measured ok | measured OOM |", "| --- | ---: | ---: |",
             f"| fits | {counts['fits, ok']} | {counts['fits, OOM']} |",
             f"| does not fit | {counts['does not fit, ok']} | {counts['does not fit, OOM']} |", ""]
    if emulated:
        lines.append(f"right on {right} of {len(emulated)} emulated rows ({right / len(emulated):.0%}); "
                     f"'fits' but OOM: {sum(v.fits and v.oom for v in emulated)}")
    return lines

"""Fit verdicts against measured ok/OOM and against the margin (zeroest/report/verdicts.py)."""

from pathlib import Path

from zeroest.estimator.catalog.fit import usable_bytes
from zeroest.estimator.units import GiB

from zeroest.report.load import RunRow
from zeroest.report.verdicts import VERDICT_HEADERS, verdict_from_row, verdict_rows, verdict_table

CARD = 24 * GiB
EDGE = usable_bytes(CARD, 0.1)
"""floor(0.9 * 24 GiB): the usable budget at margin 10%."""


def _row(status, *, stored=None, measured=None, card=CARD, rank=0, expandable=False):
    data = {"run_key": f"k{stored}{measured}{status}", "rank": rank, "status": status,
            "setup": {"model": "m", "stage": 2, "gpu_memory_bytes": card, "expandable_segments": expandable},
            "prediction": {"device_bytes": stored} if stored else {},
            "measured": {"oom": "init" if status == "oom" else None, "device_bytes": measured},
            "gpu": {"memory_bytes": 141 * GiB}}
    return RunRow(source=Path("x"), line=1, data=data)


def _verdict(current, status, **kw):
    return verdict_from_row(_row(status, **kw), current, 0.1)


def test_the_current_prediction_decides_and_the_stored_one_is_shown_beside_it():
    # stored at run time: fits (EDGE); the current estimator: EDGE + 1 byte, does not fit; the run OOMed
    v = _verdict(EDGE + 1, "oom", stored=EDGE, measured=CARD)
    assert (v.fits, v.stored_fits, v.right, v.stored_right) == (False, True, True, False)
    assert v.usable_bytes == EDGE and v.card_bytes == CARD and v.emulated


def test_a_run_over_the_usable_budget_did_not_fit_at_the_margin():
    over = _verdict(EDGE + GiB, "ok", measured=EDGE + 1)     # "does not fit", ran inside the margin
    assert over.over_budget and not over.right and over.right_at_margin
    optimistic = _verdict(EDGE, "ok", measured=EDGE + 1)     # "fits", ran, but used more than the budget
    assert optimistic.fits and not optimistic.right_at_margin and optimistic.right
    within = _verdict(EDGE, "ok", measured=EDGE)
    assert within.right and within.right_at_margin and not within.over_budget
    oom = _verdict(EDGE - GiB, "oom", measured=CARD)          # "fits" but OOM: wrong either way
    assert not oom.right and not oom.right_at_margin


def test_table_counts_and_rates():
    items = [_verdict(EDGE, "ok", stored=EDGE, measured=EDGE),          # right, right at margin
             _verdict(EDGE + 1, "oom", stored=EDGE, measured=CARD),     # right; stored said fits: OOM
             _verdict(EDGE + GiB, "ok", stored=EDGE + GiB, measured=EDGE + 1),  # wrong; right at margin
             _verdict(EDGE, "ok", measured=EDGE + 1)]                   # right; over the budget
    lines = verdict_table(items, 0.1)
    assert "| fits | 2 | 0 |" in lines and "| does not fit | 1 (1 over the usable budget) | 1 |" in lines
    rates = lines[-1]
    assert "current 3 of 4 (75.0%), stored at run time 1 of 3 (33.3%)" in rates
    assert "at the margin (a run over the usable budget did not fit): current 3 of 4 (75.0%)" in rates
    assert "'fits' but OOM: current 0, stored 1; 'fits' but over the budget: 1" in rates
    rows = verdict_rows(items)
    assert all(len(r) == len(VERDICT_HEADERS) for r in rows)
    assert [r[-1] for r in rows] == ["yes", "yes", "yes", "**no**"]
    assert [r[-3] for r in rows] == ["+0.0%", "-", f"{100 * GiB / (EDGE + 1):+.1f}%", f"{-100 / (EDGE + 1):+.1f}%"]


def test_rates_at_the_margin_are_split_by_allocator_when_both_were_measured():
    default = [_verdict(EDGE, "ok", measured=EDGE), _verdict(EDGE, "ok", measured=EDGE + 1)]
    expandable = [_verdict(EDGE + GiB, "ok", measured=EDGE - GiB, expandable=True)]  # "does not fit": conservative
    assert expandable[0].expandable and not default[0].expandable
    lines = verdict_table(default + expandable, 0.1)
    assert lines[-1] == ("at the margin by allocator: torch's default allocator 1 of 2 (50.0%), 'fits' but over the "
                         "budget 1; expandable segments 0 of 1 (0.0%), 'fits' but over the budget 0")
    assert not verdict_table(default, 0.1)[-1].startswith("at the margin by allocator")  # one allocator: no split


def test_rows_skipped_and_the_row_gpu_used_without_an_emulated_card():
    assert _verdict(EDGE, "ok", rank=1) is None and _verdict(EDGE, "error") is None and _verdict(None, "ok") is None
    v = verdict_from_row(_row("ok", card=None), 30 * GiB, 0.1)
    assert v.card_bytes == 141 * GiB and v.fits and not v.emulated and v.stored_fits is None

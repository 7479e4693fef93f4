"""Fit verdicts against measured ok/OOM (zeroest/report/verdicts.py)."""

from pathlib import Path

from zeroest.estimator.catalog.fit import usable_bytes
from zeroest.estimator.units import GiB

from zeroest.report.load import RunRow
from zeroest.report.verdicts import verdict_table, verdicts

CARD = 24 * GiB


def _row(device_bytes, status, card=CARD, rank=0):
    data = {"run_key": f"k{device_bytes}{status}", "rank": rank, "status": status,
            "setup": {"model": "m", "stage": 2, "gpu_memory_bytes": card},
            "prediction": {"device_bytes": device_bytes}, "measured": {"oom": "init" if status == "oom" else None},
            "gpu": {"memory_bytes": 141 * GiB}}
    return RunRow(source=Path("x"), line=1, data=data)


def test_verdict_uses_the_emulated_card_and_the_margin():
    edge = usable_bytes(CARD, 0.1)
    rows = [_row(edge, "ok"), _row(edge + 1, "oom"), _row(edge - GiB, "oom"), _row(edge + GiB, "ok"),
            _row(edge, "ok", rank=1), _row(edge, "error")]
    got = verdicts(rows, 0.1)
    assert [(v.fits, v.oom, v.right) for v in got] == [(True, False, True), (False, True, True),
                                                       (True, True, False), (False, False, False)]
    assert all(v.card_bytes == CARD for v in got)
    lines = verdict_table(got, 0.1)
    assert "| fits | 1 | 1 |" in lines and "| does not fit | 1 | 1 |" in lines
    assert lines[-1].startswith("right on 2 of 4 emulated rows (50%); 'fits' but OOM: 1")


def test_rows_without_an_emulated_card_use_the_row_gpu():
    (v,) = verdicts([_row(30 * GiB, "ok", card=None)], 0.1)
    assert v.card_bytes == 141 * GiB and v.fits and not v.emulated

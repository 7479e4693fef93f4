"""OUT/runs.jsonl: one JSON line per rank per run, appended and flushed as each run ends; resuming and
refusing.

A row's top-level keys: ``zeroest_version``, ``run_key``, ``launcher``, ``setup`` (``setup_to_dict``),
``rank``, ``world_size``, ``ranks_in_run``, ``simulated``, ``status`` (ok, oom, error, timeout, crashed),
``error``, ``prediction`` (``Estimate.to_dict()`` made before the run, or null with ``prediction_error``),
``measured`` (per phase and overall: ``peak_allocated_bytes``, ``peak_reserved_bytes``, ``device_bytes``,
``phases``, ``oom``, ``step_time_s``, ``tokens_per_s``), ``versions``, ``gpu`` or ``cpu``, ``host``,
``exclusive``, ``wall_s``, ``finished_at``.

A run is done when all of its ``ranks_in_run`` rows are in the file; a half-written last line (validate
killed while writing) is ignored and that run is redone.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

RUNS_FILE = "runs.jsonl"
STATUSES = ("ok", "oom", "error", "timeout", "crashed")


def read_rows(path: Path) -> list[dict]:
    """Every well-formed row of a runs.jsonl (missing file: none)."""
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            log.warning(
                "%s:%d: ignoring a malformed line (a run cut off while writing is redone)", path, number
            )
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def check_version(rows: list[dict], version: str, path: Path) -> None:
    """Refuse to mix rows of another zeroest version into one results file."""
    others = sorted({str(r.get("zeroest_version")) for r in rows if r.get("zeroest_version") != version})
    if others:
        raise ValueError(
            f"{path} holds runs of zeroest {', '.join(others)}, and this is zeroest {version}: "
            "results of different versions are not mixed; pass a new --out directory"
        )


def done_keys(rows: list[dict]) -> set[str]:
    """run_keys whose every rank has a row."""
    counts: dict[str, int] = {}
    expected: dict[str, int] = {}
    for row in rows:
        key = row.get("run_key")
        if key is None:
            continue
        counts[key] = counts.get(key, 0) + 1
        expected[key] = int(row.get("ranks_in_run", 1))
    return {key for key, n in counts.items() if n >= expected[key]}


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append rows in one write, flushed and fsynced, so a killed validate loses nothing already measured."""
    text = "".join(json.dumps(row, sort_keys=False) + "\n" for row in rows)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def drop_runs(path: Path, keys: set[str]) -> int:
    """Remove the rows of ``keys`` (for ``--redo``); the old file is kept as runs.jsonl.bak. Returns rows
    dropped."""
    rows = read_rows(path)
    keep = [r for r in rows if r.get("run_key") not in keys]
    if len(keep) == len(rows):
        return 0
    backup = path.with_suffix(".jsonl.bak")
    os.replace(path, backup)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
    os.replace(tmp, path)
    return len(rows) - len(keep)


def _status(rank_result: dict | None, failure: str | None) -> str:
    if rank_result is not None and rank_result.get("measured", {}).get("oom"):
        return "oom"
    if failure and failure.startswith("timeout"):
        return "timeout"
    if rank_result is None:
        return "crashed"
    if rank_result.get("complete"):
        return "ok"
    return "error" if rank_result.get("error") else "crashed"


def make_rows(
    *,
    run_key: str,
    launcher: str,
    setup: dict,
    simulated: bool,
    ranks: list[dict | None],
    first_rank: int = 0,
    prediction: dict | None,
    prediction_error: str | None,
    exclusive: bool,
    wall_s: float,
    failure: str | None,
    version: str,
) -> list[dict]:
    """One row per rank of a finished (or failed) run on this node. ``ranks[i]`` is rank ``first_rank + i``'s
    file, None if it left none."""
    rows = []
    for rank, result in enumerate(ranks, start=first_rank):
        result = result or {}
        measured = result.get("measured") or {"phases": {}, "oom": None}
        error = result.get("error") or failure
        row = {
            "zeroest_version": version,
            "run_key": run_key,
            "launcher": launcher,
            "setup": setup,
            "rank": rank,
            "world_size": int(setup["world_size"]),
            "ranks_in_run": len(ranks),
            "simulated": simulated,
            "status": _status(result or None, failure),
            "error": error,
            "prediction": prediction,
            "prediction_error": prediction_error,
            "measured": measured,
            "versions": result.get("versions"),
            "host": result.get("host"),
            "exclusive": exclusive,
            "wall_s": round(wall_s, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if "gpu" in result:
            row["gpu"] = result["gpu"]
        elif "cpu" in result:
            row["cpu"] = result["cpu"]
        if result.get("traceback"):
            row["traceback"] = result["traceback"]
        rows.append(row)
    return rows


def measured_reductions(runs_path) -> dict:
    """Stage-0 peak over each stage's peak, from runs files (``zeroest claims --runs``); the work is
    ``zeroest.report.runs.measured_reductions``."""
    from zeroest.report.runs import measured_reductions as reductions

    return reductions(runs_path)

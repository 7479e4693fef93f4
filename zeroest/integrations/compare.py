"""A watched job's measured phase peaks against the estimate of its setup: the verdict, the warnings, the rows.

Rows are in the runs.jsonl schema (``zeroest.report.runs``), one per rank, each rank appending its own (the
writer locks the folder, so ranks on one file never cut each other's lines). A watched row is told from a grid
row by ``measured.source == "watch"`` (the schema's place for a run's own facts; the row's top-level keys are
fixed there) and by its ``run_key``, ``watch-<hash>``. Its ``setup.model`` is ``models/<label>.json``, the HF
config written next to the runs file, so ``zeroest report`` rebuilds the setup as it does for validate's rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from zeroest.estimator.units import format_gib

log = logging.getLogger("zeroest.watch")

SOURCE = "watch"
COMPARED = ("forward", "backward", "step")
UNDER_TOLERANCE = 0.01
"""A phase measured above its prediction by more than this fraction is always warned about: that side OOMs."""


@dataclass(frozen=True, kw_only=True)
class PhaseCheck:
    """One phase's measured peak against the prediction (bytes), ``error = (predicted - measured) / measured``."""

    phase: str
    measured_bytes: int
    predicted_bytes: int

    @property
    def error(self) -> float:
        return (self.predicted_bytes - self.measured_bytes) / self.measured_bytes

    def diverges(self, threshold: float) -> bool:
        """Off by more than ``threshold`` either way, or under-predicted by more than ``UNDER_TOLERANCE``."""
        return abs(self.error) > threshold or self.error < -UNDER_TOLERANCE


def check_phases(measured: dict[str, int], predicted: dict[str, int]) -> list[PhaseCheck]:
    """A check of every compared phase that was both measured and predicted."""
    return [PhaseCheck(phase=p, measured_bytes=int(measured[p]), predicted_bytes=int(predicted[p]))
            for p in COMPARED if measured.get(p) and p in predicted]


def warn(checks: list[PhaseCheck], threshold: float, rank: int, setup_line: str) -> list[str]:
    """Log one warning per diverging phase on this rank; returns the lines."""
    lines = []
    for c in checks:
        if not c.diverges(threshold):
            continue
        side = "under-predicted: the estimate would let this job OOM" if c.error < 0 else "over-predicted"
        lines.append(f"rank {rank}: {c.phase} peak measured {format_gib(c.measured_bytes, 3)}, predicted "
                     f"{format_gib(c.predicted_bytes, 3)} ({c.error:+.1%}, {side}) for {setup_line}")
    for line in lines:
        log.warning(line)
    return lines


def run_key(flat_setup: dict, run_id: str | None, world_size: int) -> str:
    """The key every rank of one watched job shares: its setup and the launcher's job identity (torchrun's
    ``TORCHELASTIC_RUN_ID``, ``MASTER_ADDR``/``MASTER_PORT``, the launcher's pid shared by a node's ranks; the pid
    itself for one process), or ``run_id`` when given."""
    if run_id is None:
        env = [os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")]
        run_id = ":".join([*env, str(os.getppid() if world_size > 1 else os.getpid()), str(time.time_ns())
                           if world_size == 1 else ""])
    blob = json.dumps({"setup": flat_setup, "run": run_id}, sort_keys=True)
    return f"{SOURCE}-{hashlib.sha1(blob.encode()).hexdigest()[:16]}"


def launcher() -> str:
    """The launcher as the environment shows it."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") or os.environ.get("ACCELERATE_DYNAMO_BACKEND"):
        return "accelerate"
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return "torchrun"
    if os.environ.get("CROSS_RANK") is not None or os.environ.get("DS_ACCELERATOR_LAUNCH"):
        return "deepspeed"
    return "python"


def write_model(config: dict, runs_path: Path, label: str) -> str:
    """Write the HF config to ``models/<label>.json`` beside the runs file (atomically: every rank writes the
    same bytes); returns the setup's ``model`` (relative, resolved against the runs file's folder)."""
    rel = f"models/{label}.json"
    path = runs_path.parent / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(config, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return rel


def measured_block(phases: dict[str, dict], step_times: list[float], tokens_per_step: int, *, oom: str | None,
                   extra: dict) -> dict:
    """The row's ``measured``: overall peaks over the watched phases (``validate.measure.summarize``), step time
    (median over the steps after the first when there are any), and the watch's own facts in ``extra``."""
    from zeroest.validate.measure import summarize

    steady = step_times[1:] or step_times
    step_s = statistics.median(steady) if steady else None
    return {
        "phases": phases, "oom": oom, **summarize(phases),
        "step_time_s": step_s, "tokens_per_s": tokens_per_step / step_s if step_s else None,
        "step_times_s": list(step_times), "source": SOURCE, **extra,
    }


def rows_for(*, key: str, flat_setup: dict, rank: int, world_size: int, result: dict, prediction: dict | None,
             prediction_error: str | None, wall_s: float) -> list[dict]:
    """This rank's row (``runs.make_rows``); ``ranks_in_run`` is the job's world size: every rank writes one."""
    from zeroest import __version__
    from zeroest.report.runs import make_rows

    rows = make_rows(run_key=key, launcher=launcher(), setup=flat_setup, simulated=False, ranks=[result],
                     first_rank=rank, prediction=prediction, prediction_error=prediction_error, exclusive=False,
                     wall_s=wall_s, failure=None, version=__version__)
    for row in rows:
        row["ranks_in_run"] = int(world_size)
    return rows


def append(path: Path, rows: list[dict]) -> int:
    """Append the rows unless the file holds rows of another zeroest version (logged, nothing written)."""
    from zeroest import __version__
    from zeroest.report.runs import append_rows, check_version, read_rows

    try:
        check_version(read_rows(path), __version__, path)
    except ValueError as exc:
        log.warning("%s; the watched rows were not written", exc)
        return 0
    return append_rows(path, rows)

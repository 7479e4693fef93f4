"""runs.jsonl: the one schema, reader and writer of measured runs (``zeroest validate`` writes, ``zeroest report``
and ``zeroest claims`` read).

One JSON object per line, one line per rank per run. Keys:

Required (the reader rejects a row without them, or of another type):

* ``zeroest_version`` (str): the zeroest that planned the run and made its ``prediction``. The setup's keys
  and the stored prediction mean what that version meant, so validate never appends to a file of another
  version (``check_version``) and the report skips such rows with the reason.
* ``run_key`` (str): validate's resume key (setup, simulated, launcher, device); every rank of a run shares it.
* ``setup`` (object): the flat setup (``zeroest.estimator.configs.flat.setup_to_dict``).
* ``rank``, ``world_size``, ``ranks_in_run`` (int): this rank, the run's N_d, and how many rows this run's
  node writes (a run is done when the file holds that many rows of its ``run_key``).
* ``simulated`` (bool): ranks ran on a fake process group (no communication, no NCCL memory).
* ``status`` (str, one of ``STATUSES``): ok, oom, error, timeout or crashed.
* ``measured`` (object): overall ``peak_allocated_bytes``, ``peak_reserved_bytes``, ``device_bytes``, ``oom``
  (the phase it died in, or null), ``step_time_s``, ``tokens_per_s`` and ``phases`` (the same per phase);
  any of them may be missing or null for a run that did not finish.

Optional (absent or null when unknown): ``launcher`` (str), ``error`` (str), ``traceback`` (str),
``prediction`` (``Estimate.to_dict()`` made before the run) with ``prediction_error`` (why there is none),
``versions`` (object: python, torch, cuda, driver, deepspeed, transformers, accelerate: the software the
run measured; torch and deepspeed pick the calibration group), ``gpu`` (object: name, memory_bytes, ...) or
``cpu`` (object), ``host`` (object), ``exclusive`` (bool: the run had its GPU to itself), ``wall_s``
(float), ``finished_at`` (str, ISO 8601).

There is no separate schema version: ``zeroest_version`` is it. The reader checks rows of this zeroest
version against the schema above; a row of another version only needs its ``zeroest_version`` (its keys are
that version's), and every consumer refuses or skips it by version (``check_version``, ``load_runs``).

A row is identified by (``run_key``, ``rank``). ``append_rows`` never writes a row whose identity the file
already holds, and replaces the file in one rename, so a writer killed at any moment leaves the old file or
the new one, never a cut line; a malformed line is therefore an error (``RunsFileError``, one line naming the
file and line), not something to skip. This module needs no estimator, torch or numpy.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from zeroest import __version__

log = logging.getLogger(__name__)

RUNS_FILE = "runs.jsonl"
STATUSES: tuple[str, ...] = ("ok", "oom", "error", "timeout", "crashed")
REQUIRED: dict[str, str] = {
    "zeroest_version": "str", "run_key": "str", "setup": "object", "rank": "int", "world_size": "int",
    "ranks_in_run": "int", "simulated": "bool", "status": "str", "measured": "object",
}
"""Required keys and their JSON types (see the module docstring)."""
OPTIONAL: tuple[str, ...] = (
    "launcher", "error", "traceback", "prediction", "prediction_error", "versions", "gpu", "cpu", "host",
    "exclusive", "wall_s", "finished_at",
)


class RunsFileError(ValueError):
    """A runs file (or a row meant for one) that breaks the schema; the message is one line: where, what, how
    to fix."""


def _is(value: object, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    return isinstance(value, {"str": str, "object": dict}[kind])


def row_problem(row: object) -> str | None:
    """Why ``row`` breaks the schema, or None."""
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object"
    missing = [key for key in REQUIRED if key not in row]
    if missing:
        return f"no {', '.join(missing)} (required keys: {', '.join(REQUIRED)})"
    for key, kind in REQUIRED.items():
        if not _is(row[key], kind):
            return f"{key} is {json.dumps(row[key])[:40]}, not a JSON {kind}"
    if row["status"] not in STATUSES:
        return f"status {row['status']!r} is not one of {', '.join(STATUSES)}"
    return None


def _own(row: object) -> bool:
    """Not a row of another zeroest version (whose keys this version does not check)."""
    version = row.get("zeroest_version") if isinstance(row, dict) else None
    return not isinstance(version, str) or version == __version__


def parse_rows(text: str, where: str | Path) -> list[tuple[int, dict]]:
    """(line number, row) of every non-blank line of a runs file's text; ``RunsFileError`` at the first
    malformed line (rows of another zeroest version need only their ``zeroest_version``)."""
    out = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): it also splits at U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RunsFileError(f"{where}:{number}: not valid JSON ({exc.msg}, column {exc.colno}); "
                                "fix or delete that line") from None
        problem = row_problem(row) if _own(row) else None
        if problem:
            raise RunsFileError(f"{where}:{number}: not a runs.jsonl row: {problem}; fix or delete that line")
        out.append((number, row))
    return out


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise RunsFileError(f"{path}: not UTF-8 text; pass a runs.jsonl written by zeroest validate") from None


def read_numbered(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of every row of a runs file (a missing file has none); ``RunsFileError`` for a
    malformed line."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RunsFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return parse_rows(_decode(data, path), path)


def read_rows(path: Path) -> list[dict]:
    """Every row of a runs file, in file order (a missing file has none); ``RunsFileError`` for a malformed
    line."""
    return [row for _, row in read_numbered(path)]


def runs_files(paths: Iterable[str | Path]) -> list[Path]:
    """The .jsonl files named, or found (recursively, sorted) under the folders named; ValueError for a
    missing path."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            files += sorted(path.rglob("*.jsonl"))
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"runs path {str(raw)!r} does not exist: pass a runs.jsonl or a folder of them")
    return list(dict.fromkeys(files))


def default_runs_dir() -> Path:
    """data/runs of the working directory when there is one, else of this checkout."""
    here = Path("data/runs")
    return here if here.is_dir() else Path(__file__).resolve().parents[2] / "data" / "runs"


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` (one writer of its runs file at a time, across processes)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _replace(path: Path, data: bytes) -> None:
    """Write ``data`` beside ``path``, fsync it, rename it over ``path`` (atomic), fsync the folder."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _line(row: dict) -> bytes:
    return (json.dumps(row) + "\n").encode("utf-8")


def append_rows(path: Path, rows: Sequence[dict]) -> int:
    """Append ``rows`` to the runs file ``path``; returns how many were written.

    Rows whose (run_key, rank) the file already holds are not written again (logged). The rows already there
    keep their bytes; the new file replaces the old in one rename, under a lock on the folder, so a writer
    killed mid-write, or a second writer, never cuts or loses a row. ``RunsFileError`` for a malformed row
    (nothing is written) or a malformed file.
    """
    path = Path(path)
    for index, row in enumerate(rows):
        problem = row_problem(row)
        if problem:
            raise RunsFileError(f"row {index} to append to {path} breaks the schema: {problem}")
    with _locked(path.parent):
        old = path.read_bytes() if path.exists() else b""
        seen = {(r.get("run_key"), r.get("rank")) for _, r in parse_rows(_decode(old, path), path)}
        new = []
        for row in rows:
            ident = (row["run_key"], row["rank"])
            if ident in seen:
                log.warning("%s already holds rank %d of run %s: not written again", path, row["rank"],
                            row["run_key"])
                continue
            seen.add(ident)
            new.append(row)
        if new:
            head = old if not old or old.endswith(b"\n") else old + b"\n"
            _replace(path, head + b"".join(map(_line, new)))
    return len(new)


def drop_runs(path: Path, keys: set[str]) -> int:
    """Remove the rows of the runs ``keys`` (``validate --redo``); the file as it was is kept as
    runs.jsonl.bak. Returns the rows dropped. Kept rows keep their bytes; both files are replaced
    atomically."""
    path = Path(path)
    with _locked(path.parent):
        if not path.exists():
            return 0
        old = path.read_bytes()
        text = _decode(old, path)
        rows = dict(parse_rows(text, path))
        lines = text.split("\n")
        keep = [line for n, line in enumerate(lines, 1) if n not in rows or rows[n].get("run_key") not in keys]
        dropped = len(lines) - len(keep)
        if dropped:
            _replace(path.with_suffix(".jsonl.bak"), old)
            _replace(path, "\n".join(keep).encode("utf-8"))
    return dropped


def done_keys(rows: Iterable[dict]) -> set[str]:
    """run_keys whose every rank (``ranks_in_run`` of them) has a row (rows of this version)."""
    ranks: dict[str, set[int]] = {}
    expected: dict[str, int] = {}
    for row in filter(_own, rows):
        ranks.setdefault(row["run_key"], set()).add(row["rank"])
        expected[row["run_key"]] = row["ranks_in_run"]
    return {key for key, seen in ranks.items() if len(seen) >= expected[key]}


def check_version(rows: Iterable[dict], version: str, path: Path) -> None:
    """Refuse (ValueError) to mix rows of another zeroest version into one runs file."""
    others = sorted({str(r["zeroest_version"]) for r in rows if r["zeroest_version"] != version})
    if others:
        raise ValueError(
            f"{path} holds runs of zeroest {', '.join(others)}, and this is zeroest {version}: "
            "results of different versions are not mixed; pass a new --out directory"
        )


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
    """One row per rank of a finished (or failed) run on this node. ``ranks[i]`` is the worker's result file
    of rank ``first_rank + i`` (``complete``, ``error``, ``traceback``, ``measured``, ``versions``, ``host``,
    ``gpu`` or ``cpu``), None if it left none."""
    rows = []
    for rank, result in enumerate(ranks, start=first_rank):
        result = result or {}
        row = {
            "zeroest_version": version,
            "run_key": run_key,
            "launcher": launcher,
            "setup": setup,
            "rank": rank,
            "world_size": int(setup["world_size"]),
            "ranks_in_run": len(ranks),
            "simulated": bool(simulated),
            "status": _status(result or None, failure),
            "error": result.get("error") or failure,
            "prediction": prediction,
            "prediction_error": prediction_error,
            "measured": result.get("measured") or {"phases": {}, "oom": None},
            "versions": result.get("versions"),
            "host": result.get("host"),
            "exclusive": exclusive,
            "wall_s": round(wall_s, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        for key in ("gpu", "cpu"):
            if key in result:
                row[key] = result[key]
                break
        if result.get("traceback"):
            row["traceback"] = result["traceback"]
        rows.append(row)
    return rows


def run_label(setup: dict, simulated: bool) -> str:
    """``gpt2 z3 N=4(sim) mb2x1024 bf16 adamw/fused ckpt zinit off:opt lora:r8 xseg``: a run at a glance, from the
    flat setup of a row (the one label of validate's summary and the report's tables; ``xseg``: expandable
    segments)."""
    parts = [
        str(setup["model"]).rsplit("/", 1)[-1].removesuffix(".json"),
        f"z{setup['stage']}",
        f"N={setup['world_size']}" + ("(sim)" if simulated else ""),
        f"mb{setup['micro_batch']}x{setup['seq_len']}",
    ]
    if int(setup.get("grad_accum", 1)) > 1:
        parts.append(f"ga{setup['grad_accum']}")
    parts.append(f"{setup['dtype']} {setup['optimizer']}/{setup['optimizer_impl']}")
    if setup.get("grad_ckpt"):
        parts.append("ckpt")
    if int(setup["stage"]) == 3 and setup.get("zero_init"):
        parts.append("zinit")
    offload = [name for name, key in (("opt", "offload_optimizer"), ("par", "offload_params"))
               if setup.get(key, "none") != "none"]
    if offload:
        parts.append("off:" + "+".join(offload))
    if setup.get("lora_rank"):
        parts.append(f"lora:r{setup['lora_rank']}")
    if setup.get("freeze"):
        parts.append(f"freeze:{setup['freeze']}")
    if setup.get("expandable_segments"):
        parts.append("xseg")
    return " ".join(parts)

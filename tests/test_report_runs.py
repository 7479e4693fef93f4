"""runs.jsonl: the schema check, the strict reader (one line naming file and line) and the atomic, duplicate-free
writer."""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest

from zeroest.report import runs
from zeroest.report.runs import (
    RunsFileError,
    append_rows,
    check_version,
    done_keys,
    drop_runs,
    read_numbered,
    read_rows,
)


def _row(key: str, rank: int = 0, ranks: int = 1, **extra) -> dict:
    return {"zeroest_version": "0.1.0", "run_key": key, "setup": {"model": "gpt2", "stage": 0, "world_size": ranks},
            "rank": rank, "world_size": ranks, "ranks_in_run": ranks, "simulated": False, "status": "ok",
            "measured": {"peak_allocated_bytes": 1000 + rank, "phases": {}, "oom": None}, **extra}


def _error(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RunsFileError) as info:
        read_rows(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_missing_file_has_no_rows_and_blank_lines_keep_numbering(tmp_path):
    assert read_rows(tmp_path / "runs.jsonl") == []
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps(_row("a")) + "\n\n" + json.dumps(_row("b")) + "\n")
    assert [(n, r["run_key"]) for n, r in read_numbered(path)] == [(1, "a"), (3, "b")]


@pytest.mark.parametrize(("line", "says"), [
    ('{"run_key": "c", "zeroest_ver', "not valid JSON"),
    ("[1, 2]", "a JSON list, not an object"),
    (json.dumps({k: v for k, v in _row("c").items() if k != "setup"}), "no setup"),
    (json.dumps(_row("c", rank=True)), "rank is true, not a JSON int"),
    (json.dumps({**_row("c"), "simulated": 0}), "simulated is 0, not a JSON bool"),
    (json.dumps({**_row("c"), "measured": None}), "measured is null, not a JSON object"),
    (json.dumps({**_row("c"), "status": "done"}), "status 'done' is not one of ok, oom"),
])
def test_a_malformed_line_is_one_error_naming_file_and_line(tmp_path, line, says):
    path = tmp_path / "runs.jsonl"
    message = _error(path, json.dumps(_row("a")) + "\n" + line + "\n" + json.dumps(_row("b")) + "\n")
    assert message.startswith(f"{path}:2: ")
    assert says in message
    assert message.endswith("fix or delete that line")


def test_a_row_of_another_version_is_read_by_its_version_alone_and_refused(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps(_row("a")) + "\n" + json.dumps({"zeroest_version": "0.0.1", "key": "old"}) + "\n")
    rows = read_rows(path)
    assert rows[1] == {"zeroest_version": "0.0.1", "key": "old"}
    assert done_keys(rows) == {"a"}
    with pytest.raises(ValueError, match=r"holds runs of zeroest 0\.0\.1, and this is zeroest 0\.1\.0"):
        check_version(rows, "0.1.0", path)


def test_a_file_that_is_not_utf8_is_one_error(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_bytes(b"\xff\xfe{}\n")
    with pytest.raises(RunsFileError, match=r"runs\.jsonl: not UTF-8 text"):
        read_rows(path)


def test_append_keeps_earlier_bytes_and_skips_rows_already_there(tmp_path):
    path = tmp_path / "runs.jsonl"
    first = json.dumps(_row("a"), indent=None, separators=(",", ":")) + "\n"  # bytes no writer of ours makes
    path.write_text(first)
    assert append_rows(path, [_row("a"), _row("b", 0, 2), _row("b", 1, 2)]) == 2
    assert append_rows(path, [_row("b", 1, 2)]) == 0
    text = path.read_text()
    assert text.startswith(first)
    assert [(r["run_key"], r["rank"]) for r in read_rows(path)] == [("a", 0), ("b", 0), ("b", 1)]
    assert done_keys(read_rows(path)) == {"a", "b"}


def test_a_file_without_a_final_newline_gets_one_before_new_rows(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps(_row("a")))
    append_rows(path, [_row("b")])
    assert [r["run_key"] for r in read_rows(path)] == ["a", "b"]


def test_a_writer_killed_mid_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "runs.jsonl"
    append_rows(path, [_row("a")])
    before = path.read_bytes()

    def killed(src, dst):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(runs.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        append_rows(path, [_row("b")])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.jsonl"]  # no temporary file left behind


def test_a_malformed_row_is_refused_before_anything_is_written(tmp_path):
    path = tmp_path / "runs.jsonl"
    append_rows(path, [_row("a")])
    before = path.read_bytes()
    with pytest.raises(RunsFileError, match=r"row 1 to append .* no rank"):
        append_rows(path, [_row("b"), {k: v for k, v in _row("c").items() if k != "rank"}])
    assert path.read_bytes() == before


def test_append_refuses_to_extend_a_malformed_file(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps(_row("a")) + "\n{cut")
    with pytest.raises(RunsFileError, match=r"runs\.jsonl:2: not valid JSON"):
        append_rows(path, [_row("b")])


def _append_many(path: str, worker: int) -> None:
    for i in range(20):
        append_rows(path, [_row(f"w{worker}-{i}")])


def test_concurrent_writers_lose_no_row(tmp_path):
    path = tmp_path / "runs.jsonl"
    ctx = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
    procs = [ctx.Process(target=_append_many, args=(path, w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    keys = [r["run_key"] for r in read_rows(path)]
    assert sorted(keys) == sorted(f"w{w}-{i}" for w in range(4) for i in range(20))


def test_drop_runs_keeps_other_rows_bytes_and_a_backup(tmp_path):
    path = tmp_path / "runs.jsonl"
    append_rows(path, [_row("a", 0, 2), _row("a", 1, 2), _row("b")])
    before = path.read_bytes()
    assert drop_runs(path, {"a"}) == 2
    assert path.read_bytes() == before.split(b"\n", 2)[2]
    assert (tmp_path / "runs.jsonl.bak").read_bytes() == before
    assert drop_runs(path, {"nothing"}) == 0
    assert drop_runs(tmp_path / "missing.jsonl", {"a"}) == 0


def test_a_run_is_done_when_every_rank_has_a_row():
    rows = [_row("a", 0, 2), _row("a", 1, 2), _row("b", 0, 2), _row("b", 0, 2)]
    assert done_keys(rows) == {"a"}  # b's rank 0 twice is still one rank of two

"""``plan`` checks host RAM by default: this machine's, with a note, unless ``--host-ram`` gives the nodes'."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from zeroest.cli import app

runner = CliRunner()
ARGS = ["plan", "--model", "qwen2.5-1.5b", "--gpus", "2", "--gpu", "4090", "--seq-len", "512", "--activations",
        "closed-form", "--json"]


def _plan(*extra: str):
    return runner.invoke(app, [*ARGS, *extra])


def test_default_is_this_machines_ram_with_a_note(monkeypatch):
    monkeypatch.setattr("zeroest.api.this_machine_ram_bytes", lambda: 64 * 2**30)
    result = _plan()
    assert "this machine's 64 GiB" in result.output
    if result.exit_code == 0:
        doc = json.loads(result.stdout)
        assert all(c["cpu_bytes_per_node"] <= 64 * 2**30 for c in doc["candidates"])


def test_every_candidate_fits_the_host_ram_given():
    roomy = json.loads(_plan("--host-ram", "1TiB").stdout)
    need = max(c["cpu_bytes_per_node"] for c in roomy["candidates"])
    tight = _plan("--host-ram", f"{need // 2**30 - 1}GiB")
    if tight.exit_code == 0:
        assert all(c["cpu_bytes_per_node"] < need for c in json.loads(tight.stdout)["candidates"])
    else:
        assert "host RAM" in tight.output

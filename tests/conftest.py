"""Shared fixtures.

DeepSpeed on the CPU: ``ds_probe`` runs ``zeroest.validate.dsprobe.probe`` in this pytest process on torch's fake
process group (one process plays rank 0 of an N-rank job; ``validate.fakepg.init_fake_world`` switches world size
between probes and resets DeepSpeed's cached groups). After the first probe (~6 s: imports, and a one-time JIT build
of DeepSpeed's shm comm op into ~/.cache/torch_extensions, ~40 s if not cached) each probe takes 1-3 s. Results are
cached per ``ProbeConfig`` for the session, so parametrized tests that share a configuration pay once. Stage 3 on the
fake group works for rank 0 only (its trace check compares ranks through a broadcast the fake group does not
perform); use ``validate.fakepg.run_gloo`` for other ranks.

Traced activation profiles are cached in a directory of this session (``ZEROEST_CACHE_DIR``), never in the user's
``~/.cache/zeroest``: a profile traced by an earlier version of the code cannot stand in for a trace under test.

Lanes: ``-m "not slow"`` is the fast lane; ``slow`` marks tests of seconds each and the DeepSpeed variants beyond one
per ZeRO stage; a plain ``pytest`` runs everything.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers on two cores: one OpenMP thread each (and in the ranks they launch), set before torch is
    # imported, so that two workers' thread pools and a test's rank processes do not contend for the same cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")

_PROBE_CACHE: dict[Any, dict[str, Any]] = {}
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="session")
def benchmark_script():
    """``benchmark_script(name)``: ``benchmarks/<name>.py`` imported as module ``name``, with the benchmarks folder on
    the path as when the scripts run (they import one another: ``sequence_replay`` imports ``allocator_replay``)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is made
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def recording(benchmark_script):
    """``recording(model_ref, events)``: the HF config of a preset or of a model file in the repository, and the
    reserve at each phase end of ``data/runs/h200-sequences/<events>-events.json.gz`` as its own requests replay."""
    import json

    from zeroest.estimator.catalog.models import load_model
    from zeroest.estimator.core.hf_config import hf_config, layers_key

    root = BENCHMARKS.parent

    def load(model_ref: str, events: str) -> tuple[dict, dict[str, float]]:
        if model_ref.endswith(".json"):
            config = json.loads((root / model_ref).read_text())
        else:
            shape = load_model(model_ref)
            config = dict(hf_config(shape))
            config[layers_key(config["model_type"])] = shape.num_layers
        benchmark_script("allocator_replay")
        recorded, _ = benchmark_script("sequence_replay").recorded(
            str(root / f"data/runs/h200-sequences/{events}-events.json.gz"))
        return config, recorded

    return load


@pytest.fixture(scope="session", autouse=True)
def session_profile_cache(tmp_path_factory):
    """Traced profiles go to (and come from) a fresh directory for this session only."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ZEROEST_CACHE_DIR", str(tmp_path_factory.mktemp("profiles")))
        yield


@pytest.fixture(autouse=True)
def _torch_linear_as_it_was():
    """DeepSpeed's ZeRO-3 replaces ``torch.nn.functional.linear`` by ``zero3_linear_wrap`` for the rest of the process
    ("This will persist unless manually reset", partition_parameters.py ``_enable_mem_efficient_linear``); a test
    that ran ZeRO-3 puts it back, so later tests trace and measure torch's own Linear."""
    import sys

    functional = sys.modules.get("torch.nn.functional")
    linear = getattr(functional, "linear", None)
    yield
    functional = functional or sys.modules.get("torch.nn.functional")
    if functional is not None and linear is not None and functional.linear is not linear:
        functional.linear = linear


@pytest.fixture(scope="session")
def ds_probe():
    """``ds_probe(**ProbeConfig fields) -> record``: run (or reuse) one DeepSpeed probe on the fake process
    group."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")
    from zeroest.validate.dsprobe import ProbeConfig, probe

    def run(**fields: Any) -> dict[str, Any]:
        config = ProbeConfig(**fields)
        if config not in _PROBE_CACHE:
            _PROBE_CACHE[config] = probe(config)
        return _PROBE_CACHE[config]

    return run


@pytest.fixture(autouse=True)
def _host_ram_of_a_training_node(monkeypatch):
    """``plan`` checks host RAM against this machine's by default; tests plan for a 2 TiB training node instead, so
    their answers do not depend on the machine running them (``tests/test_plan_host_ram.py`` checks the default)."""
    monkeypatch.setattr("zeroest.api.this_machine_ram_bytes", lambda: 2 * 2**40)

"""Host RAM per rank and per node (estimator/core/host.py, the pinned terms of model_states/stage3) and the
report's comparison with measured RSS (zeroest/report/host.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from zeroest.estimator.catalog.models import load_model
from zeroest.estimator.configs.flat import setup_from_dict
from zeroest.estimator.core.architecture import count_params, param_tensors
from zeroest.estimator.core.estimate import estimate
from zeroest.estimator.core.model_states import flat_group_numel, pinned_bytes
from zeroest.estimator.core.overheads import Overheads
from zeroest.estimator.core.stage3 import partition_numel
from zeroest.estimator.units import GiB, MiB

from zeroest.report.host import HostRow, host_rows, host_stats
from zeroest.report.join import join_row
from zeroest.report.load import RunRow

ROOT = Path(__file__).resolve().parent.parent
OH = Overheads()


def _setup(model, stage, world, **zero):
    flat = {"model": model, "stage": stage, "world_size": world, "micro_batch": 1, "seq_len": 512,
            "activations": "closed-form", "offload_optimizer": "cpu", **zero}
    return setup_from_dict(flat, model=load_model(model))


def test_pinned_bytes_is_the_next_power_of_two():
    assert pinned_bytes(3 * GiB, True) == 4 * GiB and pinned_bytes(4 * GiB, True) == 4 * GiB
    assert pinned_bytes(4 * GiB + 1, True) == 8 * GiB and pinned_bytes(3 * GiB, False) == 3 * GiB
    assert pinned_bytes(0, True) == 0


def test_stage2_offload_terms_per_rank_and_per_node():
    s = _setup("qwen2.5-1.5b", 2, 2)
    numel = count_params(s.model).total
    part = flat_group_numel(numel, 2) // 2
    n_max = max(t.numel for t in param_tensors(s.model))
    host = estimate(s, OH).host
    # master and fp32 gradient partitions (4p each), the 16-bit copy (2p) and the staging buffer (2 n_max): pinned
    assert host.pinned_bytes == 2 * pinned_bytes(4 * part, True) + pinned_bytes(2 * part, True) + pinned_bytes(
        2 * n_max, True)
    assert host.pageable_bytes == 8 * part                       # AdamW's exp_avg and exp_avg_sq, fp32
    assert host.model_load_bytes == 2 * numel
    assert host.process_bytes == OH.host_process_bytes + OH.host_comm_bytes
    assert estimate(s, OH, simulated=True).host.process_bytes == OH.host_process_bytes
    assert estimate(s, OH).cpu_bytes_per_node == 2 * host.per_rank_bytes
    assert sum(host.components().values()) == host.per_rank_bytes
    note = next(n for n in estimate(s, OH).assumptions if n.startswith("host RAM per node"))
    assert note.startswith(f"host RAM per node: 2 ranks x ({host.process_bytes / GiB:.2f} GiB process + "
                           f"{2 * numel / GiB:.2f} GiB model load + {host.pinned_bytes / GiB:.2f} GiB pinned")
    unpinned = estimate(replace(s, zero=replace(s.zero, pin_memory=False)), OH).host
    assert unpinned.pinned_bytes == 8 * part + 2 * part + 2 * n_max


def test_gradient_accumulation_adds_one_pinned_buffer_per_parameter_of_the_partition():
    s = _setup("tinyllama-1.1b", 2, 1)
    acc = replace(s, workload=replace(s.workload, grad_accum=4))
    per_param = sum(pinned_bytes(2 * t.numel, True) for t in param_tensors(s.model))  # N_d 1: every parameter
    assert estimate(acc, OH).host.pinned_bytes - estimate(s, OH).host.pinned_bytes == per_param


def test_stage3_param_offload_holds_each_pinned_partition():
    s = _setup("qwen2.5-0.5b", 3, 4, offload_params="cpu")
    no_par = _setup("qwen2.5-0.5b", 3, 4)
    tensors = param_tensors(s.model)
    p3 = sum(partition_numel(t.numel, 4) for t in tensors)
    extra = pinned_bytes(2 * p3, True) + sum(pinned_bytes(2 * partition_numel(t.numel, 4), True) for t in tensors)
    assert estimate(s, OH).host.pinned_bytes - estimate(no_par, OH).host.pinned_bytes == extra
    assert estimate(no_par, OH).host.pageable_bytes == 4 * p3 + 8 * p3     # fp32 master and AdamW states


@pytest.mark.slow
def test_measured_offload_row_is_within_three_percent_and_not_under():
    """data/runs/h200-cards line 12: qwen2.5-1.5b ZeRO-1, optimizer offload, rank 0 of 2 simulated, RSS 17.95 GiB."""
    import json

    path = ROOT / "data" / "runs" / "h200-cards" / "runs.jsonl"
    data = json.loads(path.read_text().splitlines()[11])
    (h,) = host_rows([join_row(RunRow(source=path, line=12, data=data))])
    assert h.simulated and h.offload and h.measured_rss_bytes == 19_273_142_272
    assert 0 <= h.error < 0.03
    assert h.per_node_bytes == 2 * (h.held_bytes + h.terms["model_load"])


def test_host_stats_split_by_offload():
    rows = [HostRow(label="a", simulated=True, ranks_per_node=2, measured_rss_bytes=2 * GiB, build_rss_bytes=None,
                    terms={"process": 2 * GiB + 205 * MiB, "pinned": 0, "pageable": 0, "model_load": GiB}),
            HostRow(label="b", simulated=False, ranks_per_node=1, measured_rss_bytes=20 * GiB, build_rss_bytes=None,
                    terms={"process": 2 * GiB, "pinned": 8 * GiB, "pageable": 9 * GiB, "model_load": GiB})]
    assert host_stats(rows, offload=True).median_abs_error == pytest.approx(0.05)      # 19 / 20 - 1
    assert host_stats(rows, offload=False).median_abs_error == pytest.approx(205 / 2048)
    assert host_stats(rows).n == 2 and rows[0].per_node_bytes == 2 * (2 * GiB + 205 * MiB + GiB)


def test_measured_pinned_bytes_are_summarized_and_shown():
    from zeroest.validate.measure import summarize

    phases = {"build": {"pinned_bytes": 64 * GiB}, "init": {"pinned_bytes": 8 * GiB, "rss_bytes": 12 * GiB},
              "step0.step": {"pinned_bytes": 10 * GiB, "rss_bytes": 18 * GiB}}
    got = summarize(phases)
    assert got["host_pinned_bytes"] == 10 * GiB and got["host_rss_bytes"] == 18 * GiB   # build left out
    from zeroest.report.host import host_section
    from zeroest.report.markdown import pct

    row = HostRow(label="x", simulated=True, ranks_per_node=2, measured_rss_bytes=18 * GiB, build_rss_bytes=None,
                  measured_pinned_bytes=10 * GiB,
                  terms={"process": 2 * GiB, "pinned": 10 * GiB, "pageable": 6 * GiB, "model_load": GiB})
    (line,) = [ln for ln in host_section([row], pct) if ln.startswith("| x |")]
    assert line.split(" | ")[1:7] == ["2.00", "10.00", "10.00", "6.00", "18.00", "18.00"]

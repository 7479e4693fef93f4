"""Stage 1's end of backward: ``reduce_gradients`` moves the model's gradients through the ipg bucket into
``grads_in_partition`` (``stage1_partition_copy_bytes``), against hand-derived numbers, real DeepSpeed on the CPU and
measured H200 rows."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
from zeroest.estimator.core.architecture import shape_from_config
from zeroest.estimator.core.flat_group import _partition_copy_excess, stage1_partition_copy_bytes
from zeroest.estimator.core.setup import Optimizer, Parallelism, TrainingSetup, Workload, ZeroConfig


@pytest.mark.parametrize(("rank", "bucket", "excess"), [
    # numels 40, 30, 20, 10 (P = 100, N = 2: slices [0, 50) and [50, 100)); rank 0 overlaps 40 + 30 = 70.
    # B_r = 50: the first bucket holds 40 (freed) and is reduced when 30 arrives: 70 - 40 = 30.
    (0, 50, 30),
    # B_r = 100: one bucket of everything, reduced at the end, all 100 freed first: 0.
    (0, 100, 0),
    # rank 1 overlaps 30 + 20 + 10 = 60: its first in-partition reduction is the second bucket (30, 20) when 10
    # arrives, after 40 + 30 + 20 = 90 were freed: 0.
    (1, 50, 0),
    # B_r = 35: 40 exceeds the bucket and is reduced alone, never freed by the bucket: rank 0 pays all 70.
    (0, 35, 70),
])
def test_partition_copy_excess_by_hand(rank, bucket, excess):
    assert _partition_copy_excess((40, 30, 20, 10), 2, bucket, rank) == excess


TINY = dict(model_type="llama", vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def _setup(world: int, bucket: int, tied: bool = False) -> TrainingSetup:
    return TrainingSetup(model=shape_from_config({**TINY, "tie_word_embeddings": tied}, "tiny-llama"),
                         parallel=Parallelism(gpus_per_node=world), dtype="bf16",
                         optimizer=Optimizer(name="adamw", impl="torch"),
                         zero=ZeroConfig(stage=1, reduce_bucket_size=bucket, allgather_bucket_size=bucket),
                         workload=Workload(micro_batch=1, seq_len=16, activations="closed-form"))


def test_no_contiguous_gradients_copies_nothing():
    from dataclasses import replace

    setup = _setup(2, 200_000)
    assert stage1_partition_copy_bytes(setup) > 0
    off = replace(setup, zero=replace(setup.zero, contiguous_gradients=False))
    assert stage1_partition_copy_bytes(off) == 0


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.parametrize(("world", "bucket", "tied", "grad_ckpt"), [
    (2, 200_000, False, False), (4, 200_000, False, False), (2, 200_000, True, True), (4, 1_000_000, False, True),
])
def test_reduce_gradients_peak_matches_deepspeed(world, bucket, tied, grad_ckpt):
    """Live bytes over ``reduce_gradients`` (rank 0 of a fake world) rise by exactly the term."""
    pytest.importorskip("deepspeed")
    import deepspeed
    import torch
    from test_stage3_fetch import tiny_ds_config, tiny_model
    from zeroest.validate.fakepg import close_world, init_fake_world
    from zeroest.validate.memtrack import LiveBytes

    init_fake_world(0, world)
    model = tiny_model({**TINY, "tie_word_embeddings": tied}, grad_ckpt)
    ds = tiny_ds_config({"stage": 1, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket})
    tracker, rises = LiveBytes(device="cpu"), []
    try:
        with tracker:
            tracker.adopt(model.parameters())
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
            reduce = engine.optimizer.reduce_gradients

            def measured(*args, **kwargs):
                with tracker.phase("reduce") as record:
                    reduce(*args, **kwargs)
                rises.append(record.peak_bytes - record.start_bytes)

            engine.optimizer.reduce_gradients = measured
            for _ in range(2):
                ids = torch.randint(0, TINY["vocab_size"], (1, 16))
                engine.backward(engine(input_ids=ids, labels=ids).loss)
                engine.step()
    finally:
        close_world()
    assert rises == [stage1_partition_copy_bytes(_setup(world, bucket, tied))] * 2


@pytest.mark.parametrize(("folder", "line"), [
    pytest.param("h200-families", 2, marks=pytest.mark.slow),  # olmo2-small N_d 2 (traced on meta, ~7 s): was +9.0%
    ("h200-cards", 24),  # qwen2.5-3b N_d 2 + checkpointing: was +2.6%
])
def test_measured_stage1_backward(folder, line):
    """The backward phase of measured H200 rows (rank 0 of a fake world) within 0.5%, through the report's join."""
    from zeroest.report.join import join_row
    from zeroest.report.load import RunRow

    path = resources.files("zeroest.data") / "runs" / folder / "runs.jsonl"
    data = json.loads(path.read_text().splitlines()[line - 1])
    record = join_row(RunRow(source=Path(str(path)), line=line, data=data))
    assert record.current.phases["backward"] == pytest.approx(record.measured_phases["backward"], rel=5e-3)

"""ZeRO-2's bucket reductions during backward (core.reductions), from the parameter tensors alone.

Expectations follow stage_1_and_2.py: a reduction before the gradient that would pass B_r, the bucket's elements
flattened (copied) only when they span two or more ranks' partitions of the flat group.
"""

from __future__ import annotations

import pytest
from zeroest.estimator.core.architecture import param_tensors, shape_from_config
from zeroest.estimator.core.reductions import backward_reductions
from zeroest.estimator.core.setup import Parallelism, TrainingSetup, Workload, ZeroConfig

LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=4, vocab_size=256, max_position_embeddings=128,
             tie_word_embeddings=False)


def _setup(stage: int, world: int, bucket: int) -> TrainingSetup:
    return TrainingSetup(model=shape_from_config(LLAMA, "tiny-llama"), parallel=Parallelism(gpus_per_node=world),
                         dtype="bf16", zero=ZeroConfig(stage=stage, reduce_bucket_size=bucket),
                         workload=Workload(micro_batch=1, seq_len=16, activations="closed-form"))


def test_buckets_follow_backward_order_and_cover_every_gradient():
    """lm_head (16384) and the final norm come first, then layers 3..0 (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64 =
    41088 each), then the embedding: a 50000-element bucket reduces before each layer's overflow."""
    setup = _setup(2, 2, 50_000)
    reds = backward_reductions(setup)
    total = sum(t.numel for t in param_tensors(setup.model))
    assert sum(r.flattened_numel or 0 for r in reds) <= total
    layer = 4 * 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert layer == 41088
    first = reds[0]
    assert first.first and first.in_layer and first.layers_done == 0
    assert first.arriving_numel <= layer and 0 < first.layer_left < 1
    assert [r.first for r in reds] == [True] + [False] * (len(reds) - 1)
    assert not reds[-1].in_layer and reds[-1].arriving_numel == 0


@pytest.mark.parametrize("world, flattened", [(1, False), (64, True)])
def test_flatten_copies_only_buckets_that_span_partitions(world, flattened):
    """One rank (N = 1) owns the whole group: every flatten is a view, 0 copied; with 64 ranks a partition is
    ~3.2e3 elements and every bucket spans several."""
    setup = _setup(2, max(world, 2), 50_000)
    if world == 1:  # N_d = 1 runs no reduction at all
        assert backward_reductions(_setup(2, 1, 50_000)) == ()
        return
    reds = backward_reductions(setup)
    assert all((r.flattened_numel > 0) == flattened for r in reds)


@pytest.mark.parametrize("stage", [1, 3])
def test_only_stage_2_reduces_in_backward_hooks(stage):
    assert backward_reductions(_setup(stage, 4, 50_000)) == ()


def _ckpt(setup: TrainingSetup) -> TrainingSetup:
    return setup.with_(workload=Workload(micro_batch=1, seq_len=16, activations="closed-form", grad_ckpt=True))


def test_stage3_concatenates_each_bucket_padded_to_the_ranks():
    """reduce_scatter_coalesced: torch.cat of every tensor's N chunks, each padded to ceil(n / N). lm_head (256 x 64
    = 16384), the final norm and layer 3's two norms (64 each) fill the first bucket of a 20000-element B_r before
    its down_proj (8192) would pass it; at N = 3, 16384 -> 3 x 5462 = 16386 and 64 -> 3 x 22 = 66 elements."""
    reds = backward_reductions(_ckpt(_setup(3, 3, 20_000)))
    assert reds[0].flattened_numel == 16386 + 3 * 66
    assert reds[0].arriving_numel == 64 * 128
    # a bucket of one tensor that N divides is reduced in place: the lm_head alone, N = 2, B_r 16384
    assert backward_reductions(_ckpt(_setup(3, 2, 16_384)))[0].flattened_numel == 0


def test_stage3_reductions_only_under_checkpointing():
    """Without checkpointing the layers' gathered parameters are released as backward walks them; the measured
    stage-3 rows peak at the head there (reductions.py docstring)."""
    assert backward_reductions(_setup(3, 8, 20_000)) == ()
    assert backward_reductions(_ckpt(_setup(3, 8, 20_000)))


@pytest.mark.slow
def test_stage3_checkpointed_llama2_rows_within_one_percent():
    """The issue-16 class: full-MHA llama-2 2.7B at ZeRO-3 with checkpointing peaks at a bucket's concatenation in
    backward (N_d 8 and 16 simulated, both loops; measured on the H200)."""
    from importlib import resources

    from zeroest.report.join import join_rows
    from zeroest.report.load import load_runs

    runs = resources.files("zeroest.data") / "runs"
    loaded = load_runs([str(runs / "h200-misses"), str(runs / "h200-neighbours")])
    records, _ = join_rows(list(loaded.rows))
    rows = [r for r in records if r.setup.stage == 3 and r.setup.workload.grad_ckpt
            and r.setup.model.hidden_size == 2560 and r.setup.zero.max_live_parameters == 10**9]
    assert len(rows) == 3
    for r in rows:
        assert r.current.quantities["peak_allocated"] == pytest.approx(r.measured["peak_allocated"], rel=0.01)

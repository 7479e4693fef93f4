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

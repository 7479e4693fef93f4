"""benchmarks/sequence_replay.py: the ZeRO-1/2 request sequence built on the CPU. The requests DeepSpeed makes are
derived here from their sizes in stage_1_and_2.py; one recorded run (data/runs/h200-sequences) is replayed against
the built sequence phase by phase."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).parent.parent
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def seq_module(benchmark_script):
    benchmark_script("allocator_replay")
    return benchmark_script("sequence_replay")


def _model_and_trace(seq_module, config: dict, micro_batch: int, seq_len: int, ckpt: bool):
    from zeroest.estimator.core.adapters import Adapters

    model, trace, _ = seq_module.model_and_trace(config, "sdpa", Adapters(), ckpt=ckpt, micro_batch=micro_batch,
                                                 seq_len=seq_len, cut=False)
    return model, trace


def _args(**kw):
    base = {"stage": 2, "world": 2, "micro_batch": 2, "seq_len": 32, "offload": False, "loop": "custom",
            "param_groups": 1, "steps": 2, "bucket": 40_000}
    return types.SimpleNamespace(**{**base, **kw})


def _sizes(seq, kind: str) -> list[int]:
    return [op[2] for op in seq.ops if op[0] == "a" and isinstance(op[1], tuple) and op[1][0] == kind
            or op[0] == "a" and op[1] == kind]


def test_init_requests_follow_the_flat_group(seq_module):
    model, trace = _model_and_trace(seq_module, TINY, 2, 32, ckpt=False)
    trainable = sum(p.numel() for p in model.parameters())
    padded = -(-trainable // 4) * 4  # nccl_start_alignment_factor 2 x 2 ranks
    seq = seq_module.build(model, trace, _args())
    assert _sizes(seq, "flat") == [2 * padded]
    assert _sizes(seq, "clone") == [padded]  # 16-bit partition, N = 2
    assert _sizes(seq, "master") == [2 * padded]  # fp32 partition
    assert _sizes(seq, "zero_fp32_grad") == [2 * padded]
    offload = seq_module.build(model, trace, _args(offload=True))
    assert _sizes(offload, "master") == [] and _sizes(offload, "zero_fp32_grad") == []
    largest = max(p.numel() for p in model.parameters())
    assert _sizes(offload, "temp_grad_buffer_for_gpu_offload") == [2 * largest]


def test_a_flush_flattens_only_across_a_partition_edge(seq_module):
    model, trace = _model_and_trace(seq_module, TINY, 2, 32, ckpt=False)
    trainable = sum(p.numel() for p in model.parameters())
    seq = seq_module.build(model, trace, _args(steps=1, bucket=10**9))  # one flush at the end: both ranks' slices
    assert _sizes(seq, "flatten") == [2 * trainable]
    # a 70,000-element bucket flushes several times in backward; one group, so only the flush that holds gradients on
    # both sides of rank 0's partition edge (element 88,288 of 176,576) has two slices to flatten
    small = seq_module.build(model, trace, _args(steps=1, bucket=70_000))
    (flatten,) = _sizes(small, "flatten")
    assert flatten <= 2 * 70_000


def test_slices_merge_across_groups_by_rank(seq_module):
    """average_tensor merges consecutive pieces bound for the same rank whatever their group: weights and norms of
    the upper half of both groups are one slice; a norm that crosses its group's edge adds a slice for rank 0."""
    args = types.SimpleNamespace(bucket=10**9, offload=False)
    layout = {"w1": (0, 600, 100), "n1": (1, 60, 10), "w2": (0, 700, 100), "n0": (1, 45, 10)}
    bucket = seq_module.Bucket(seq_module.Sequence(), 0, args, layout, parts=[500, 50], in_partition={"n0": 5},
                               touching=0)
    for name in ("w1", "n1", "w2"):
        bucket.add(name, layout[name][2])
    assert bucket._slices() == 1
    bucket.add("n0", 10)  # elements 45-55 of the norms' group: 5 on rank 0, 5 on rank 1
    assert bucket._slices() == 3
    bucket.flush()
    assert _sizes(bucket.seq, "flatten") == [2 * 220]


def test_after_each_step_only_the_states_stay(seq_module):
    model, trace = _model_and_trace(seq_module, TINY, 2, 32, ckpt=True)
    seq = seq_module.build(model, trace, _args(steps=2, loop="trainer"))
    kinds = {key if isinstance(key, str) else key[0] for key in seq.live}
    assert kinds == {"flat", "master", "exp_avg", "exp_avg_sq", "buffer", "cublas_workspace"}
    custom = seq_module.build(model, trace, _args(steps=2))
    kept = [key for key in custom.live if isinstance(key[0], int)]
    assert kept == [(1, trace.logits)]  # the custom loop's outputs: the last step's logits


def test_stage1_makes_grads_in_partition_once_per_step(seq_module):
    model, trace = _model_and_trace(seq_module, TINY, 2, 32, ckpt=False)
    names = [(name, p.numel()) for name, p in model.named_parameters()]
    part = -(-sum(n for _, n in names) // 4) * 4 // 2
    touching, start = 0, 0
    for _, n in names:  # every parameter that starts inside rank 0's partition, whole
        touching += n if start < part else 0
        start += n
    seq = seq_module.build(model, trace, _args(stage=1, steps=2))
    assert _sizes(seq, "grads_in_partition") == [2 * touching, 2 * touching]


@pytest.mark.slow
def test_recorded_zero2_run_replays_as_built(seq_module):
    """llama-3.2-1b at ZeRO-2, rank 0 of 2, 2 x 2048 with checkpointing, the custom loop, the Trainer's two groups
    (h200-long row 8 on an emulated 4090, recorded with allocator_replay.py --events-out): the built sequence gives
    the recording's replayed peak reserve at every phase end, from the init to step 2."""
    import json

    config = json.loads((ROOT / "data/runs/h200-long/models/llama-3.2-1b.json").read_text())
    model, trace = _model_and_trace(seq_module, config, 2, 2048, ckpt=True)
    built = seq_module.replay_sequence(seq_module.build(model, trace, _args(param_groups=2, seq_len=2048, steps=3,
                                                                            bucket=500_000_000)))
    recorded, _ = seq_module.recorded(str(ROOT / "data/runs/h200-sequences/long8-events.json.gz"))
    phases = [name for name in recorded if name != "build"]
    assert len(phases) == 10
    for name in phases:
        assert built[name] == pytest.approx(recorded[name], abs=1e-6), name


def test_cublas_workspaces_follow_the_first_gemms(seq_module):
    """The recorder marks the first GEMM of forward and of backward right after its output; the sequence takes one
    32 MiB workspace at each, in the first step only, and keeps both."""
    model, trace = _model_and_trace(seq_module, TINY, 2, 32, ckpt=False)
    fwd, bwd = trace.marks["first_gemm_fwd"], trace.marks["first_gemm_bwd"]
    assert trace.marks["fwd_start"] < fwd <= trace.marks["fwd_end"] < trace.marks["bwd_start"] < bwd
    assert trace.events[fwd - 1] >= 0 and trace.events[bwd - 1] >= 0  # each just after an allocation
    seq = seq_module.build(model, trace, _args(steps=3))
    assert _sizes(seq, "cublas_workspace") == [32 * 2**20, 32 * 2**20]
    assert sum(isinstance(k, tuple) and k[0] == "cublas_workspace" for k in seq.live) == 2

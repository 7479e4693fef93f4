"""core.zero0_requests: the request sequence of ZeRO stage 0 in 16 bits (DeepSpeed's FP16_Optimizer around FusedAdam,
FP16_UnfusedOptimizer around torch's AdamW), built on the CPU from a meta-device trace. Sizes are derived here from
their terms in fp16/fused_optimizer.py, fp16/unfused_optimizer.py and engine.py; four recorded runs
(data/runs/h200-sequences/s0rec*) are replayed against the built sequence phase by phase."""

from __future__ import annotations

import pytest
from zeroest.estimator.core import allocator, zero0_requests
from zeroest.estimator.core.request_types import RequestSpec, TensorSpec

pytest.importorskip("transformers")
GiB = 2**30
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def _build(optimizer: str, *, steps: int = 1, grad_accum: int = 1, config: dict = TINY, **kw):
    from zeroest.estimator.core.adapters import Adapters
    from zeroest.estimator.trace.requests import model_and_trace, tensors_of

    model, trace, _ = model_and_trace(config, "bf16", "sdpa", Adapters(), ckpt=False, micro_batch=1, seq_len=32)
    spec = RequestSpec(**{"stage": 0, "world": 1, "offload": False, "loop": "trainer", "param_groups": 1,
                          "bucket_elements": 500_000_000, "optimizer": optimizer, "steps": steps,
                          "grad_accum": grad_accum, **kw})
    return model, zero0_requests.build0(*tensors_of(model), trace, spec)


def _sizes(seq, kind: str) -> list[int]:
    return [op[2] for op in seq.ops if op[0] == "a" and isinstance(op[1], tuple) and op[1][0] == kind]


def test_unfused_init_keeps_an_fp32_copy_and_adams_states_per_parameter():
    """FP16_UnfusedOptimizer: ``p.clone().float()`` per parameter (b n, then 4 n kept); the first step's states
    (4 n each) and ``_foreach_sqrt``'s temporaries (4 n each), on zero gradients of b n and 4 n."""
    model, seq = _build("adamw-torch")
    numels = [p.numel() for p in model.parameters()]
    assert _sizes(seq, "clone") == [2 * n for n in numels]
    assert _sizes(seq, "master") == [4 * n for n in numels]
    assert _sizes(seq, "zero_grad16") == [2 * n for n in numels]
    assert _sizes(seq, "exp_avg") == _sizes(seq, "exp_avg_sq") == [4 * n for n in numels]
    # the init's step and one training step: each a temporary per parameter
    assert _sizes(seq, "sqrt") == [4 * n for n in numels] * 2
    assert _sizes(seq, "norm32") == _sizes(seq, "grad32") == [4 * n for n in numels]


def test_fused_init_flattens_each_group_and_the_step_flattens_the_fp32_gradients():
    """FP16_Optimizer: the group's clones flattened (b P_g), the master ``clone().float()`` (b P_g, 4 P_g), FusedAdam's
    states on the flat (4 P_g each); each step the gradients' fp32 copies (4 n) and their flatten (4 P_g), no
    per-parameter temporary in the update."""
    model, seq = _build("adamw-fused", param_groups=2)
    from zeroest.estimator.core.vocab import weight_decays

    named = list(model.named_parameters())
    groups = [sum(p.numel() for name, p in named if weight_decays(name)),
              sum(p.numel() for name, p in named if not weight_decays(name))]
    assert _sizes(seq, "flat16") == [2 * g for g in groups]
    assert _sizes(seq, "master") == [4 * g for g in groups]
    assert _sizes(seq, "exp_avg") == _sizes(seq, "exp_avg_sq") == [4 * g for g in groups]
    assert _sizes(seq, "flat_grad32") == [4 * g for g in groups]
    assert not _sizes(seq, "sqrt")
    freed = {op[1] for op in seq.ops if op[0] == "f"}
    assert all(("param", name) in freed for name, _ in named)  # the parameters became views of the flat buffer


def test_allreduce_buckets_close_past_500_million_elements():
    """engine.py ``allreduce_no_retain``: a bucket closes with the tensor that takes it past the limit; a bucket of
    one tensor is flattened as a view, so it makes no request."""
    from zeroest.estimator.core.request_types import Sequence

    seq = Sequence()
    zero0_requests._allreduce(seq, 0, [300_000_000, 250_000_000, 100_000_000, 600_000_000, 10])
    assert _sizes(seq, "allreduce_flat") == [2 * 550_000_000, 2 * 700_000_000]
    seq = Sequence()
    zero0_requests._allreduce(seq, 0, [600_000_000])
    assert not _sizes(seq, "allreduce_flat")


def test_accumulated_gradients_are_added_in_place():
    """With accumulation, only the first micro-step's gradients are held to the step; the later ones are freed as
    made, so the reduction runs once per step."""
    model, seq = _build("adamw-torch", grad_accum=3)
    assert len(_sizes(seq, "allreduce_flat")) == 1
    micro = [op for op in seq.ops if op[0] == "mark" and op[1].startswith("step0.backward")]
    assert len(micro) == 3


def test_a_parameter_without_a_gradient_is_skipped():
    """``_step`` drops the held 16-bit gradients by their parameters' names; "b", which the trace gave none, has
    nothing to drop."""
    tensors = [TensorSpec("a", 8, 2, True), TensorSpec("b", 8, 2, True)]
    from zeroest.estimator.core.request_types import Sequence

    seq = Sequence()
    seq.alloc(("grad", "a"), 16)
    zero0_requests._step(seq, 0, [[(t.name, t.numel) for t in tensors]], {("grad", "a"): "a"}, fused=False)
    assert ("grad", "a") not in seq.live


RECORDED = {
    # FP16_UnfusedOptimizer, torch's AdamW, the custom loop (h200-loops row 15's setup): every phase end exact
    "unfused": ("qwen2.5-0.5b", {"micro_batch": 2, "seq_len": 1024}, {"loop": "custom", "param_groups": 2}, "s0rec1"),
    # FP16_Optimizer, FusedAdam, 1 x 4096, the Trainer's loop (h100-default row 24's setup): to 2 MiB
    "fused": ("qwen2.5-0.5b", {"micro_batch": 1, "seq_len": 4096},
              {"optimizer": "adamw-fused", "param_groups": 2}, "s0rec2"),
    # LoRA r16 on every linear, checkpointing, accumulation 2, rank 0 of 2: every phase end exact
    "lora": ("data/runs/h200-loops/models/llama-3.2-1b.json", {"micro_batch": 2, "seq_len": 1024, "ckpt": True,
             "lora": 16}, {"world": 2, "grad_accum": 2, "param_groups": 2}, "s0rec3"),
    # gpt2's tied embeddings, accumulation 4: to 2 MiB
    "tied": ("gpt2", {"micro_batch": 2, "seq_len": 1024}, {"grad_accum": 4, "param_groups": 2}, "s0rec4"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECORDED))
def test_recorded_runs_replay_as_built(recording, name):
    from zeroest.estimator.core.adapters import Adapters
    from zeroest.estimator.trace.requests import model_and_trace, tensors_of

    model_ref, shape_kw, spec_kw, events = RECORDED[name]
    config, recorded = recording(model_ref, events)
    lora = shape_kw.get("lora", 0)
    adapters = Adapters(lora_rank=lora, lora_alpha=2 * lora, lora_targets="all-linear") if lora else Adapters()
    model, trace, _ = model_and_trace(config, "bf16", "sdpa", adapters, ckpt=shape_kw.get("ckpt", False),
                                      micro_batch=shape_kw["micro_batch"], seq_len=shape_kw["seq_len"], cut=True)
    spec = RequestSpec(**{"stage": 0, "world": 1, "offload": False, "loop": "trainer", "param_groups": 1,
                          "bucket_elements": 500_000_000, "optimizer": "adamw-torch", **spec_kw})
    built = allocator.replay(zero0_requests.build0(*tensors_of(model), trace, spec))
    for phase in (phase for phase in recorded if phase != "build"):
        assert built.phases[phase] / GiB == pytest.approx(recorded[phase], abs=0.002), phase

"""The lm_head's weight gradient at the start of backward (``timeline.lm_head_grad_bytes``): measured H200 rows and
real DeepSpeed stage 3 on the CPU."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
from zeroest.estimator.core.activations import activation_profile
from zeroest.estimator.core.architecture import shape_from_config
from zeroest.estimator.core.setup import Optimizer, Parallelism, TrainingSetup, Workload, ZeroConfig
from zeroest.estimator.core.timeline import embedding_grad_bytes, lm_head_grad_bytes

WIDE_HEAD = dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
                 tie_word_embeddings=False)


def _setup(stage: int, tied: bool = False, dtype: str = "bf16") -> TrainingSetup:
    return TrainingSetup(model=shape_from_config({**WIDE_HEAD, "tie_word_embeddings": tied}, "wide-head"),
                         parallel=Parallelism(gpus_per_node=4),
                         dtype=dtype, optimizer=Optimizer(name="adamw", impl="torch"),
                         zero=ZeroConfig(stage=stage), workload=Workload(micro_batch=1, seq_len=64, loop="trainer"))


def test_weight_gradient_is_the_lm_head_and_the_fp32_log_softmax_is_gone():
    setup = _setup(3)
    act, _ = activation_profile(setup.model, 1, 64, "bf16", "sdpa", mode="closed-form")
    activations, grad = lm_head_grad_bytes(setup, act)
    assert grad == 2 * 32000 * 2048
    log_softmax = 4 * 64 * 32000
    assert activations == act.head_saved_bytes - log_softmax + act.grad_logits_bytes + act.grad_hidden_bytes


@pytest.mark.parametrize("tied", [False, True])
def test_embedding_gradient_and_the_tied_one_waiting(tied):
    assert embedding_grad_bytes(_setup(3, tied)) == (2 * 32000 * 2048, 2 * 32000 * 2048 if tied else 0)


@pytest.mark.parametrize(("folder", "line"), [
    ("h200-cards", 8),  # qwen2.5-1.5b tied, stage 1 N_d 2 + checkpointing: 2 b V h at the embedding's add
    ("h200-cards", 9),  # the same at stage 2: was -8.5%
])
def test_measured_tied_backward(folder, line):
    from zeroest.report.join import join_row
    from zeroest.report.load import RunRow

    path = resources.files("zeroest.data") / "runs" / folder / "runs.jsonl"
    data = json.loads(path.read_text().splitlines()[line - 1])
    record = join_row(RunRow(source=Path(str(path)), line=line, data=data))
    predicted, measured = record.current.phases["backward"], record.measured_phases["backward"]
    # the row is rank 0 of a simulated N_d = 2; the estimate is the rank that holds most: at stage 2 rank 1 owns
    # the last layers, reduced first, so it holds grads_in_partition through the second bucket's flatten (b E,
    # core.reductions), which rank 0 makes before its own grads_in_partition exists
    from zeroest.estimator.configs.flat import setup_from_row
    from zeroest.estimator.core.reductions import backward_reductions

    setup = setup_from_row(data["setup"])
    flatten = 2 * max((r.flattened_numel for r in backward_reductions(setup)), default=0)
    assert measured * (1 - 2e-3) <= predicted <= measured * (1 + 2e-3) + flatten


@pytest.mark.parametrize("line", [1, 2])
def test_measured_large_vocabulary_stage3_backward(line):
    """qwen2.5-7b N_d 32 and llama-3-8b N_d 64 at 1 x 512 (data/runs/h200-zeroinit): the backward phase was 2.1%
    and 3.5% under; now over by the forward's own excess only (within 1%)."""
    from zeroest.report.join import join_row
    from zeroest.report.load import RunRow

    path = resources.files("zeroest.data") / "runs" / "h200-zeroinit" / "runs.jsonl"
    data = json.loads(path.read_text().splitlines()[line - 1])
    record = join_row(RunRow(source=Path(str(path)), line=line, data=data))
    predicted, measured = record.current.phases["backward"], record.measured_phases["backward"]
    assert measured <= predicted <= 1.01 * measured


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.parametrize("tied", [False, True])
def test_stage3_backward_peak_matches_deepspeed_on_a_wide_head(tied):
    """Rank 0 of 4 on the fake process group, hidden 2048 and 32000 tokens at 1 x 64: untied, the lm_head's weight
    gradient (250 MiB in fp32) outweighs the loss's transients; tied, the embedding's end of backward (three
    gradients of 250 MiB and the gathered weight) is the peak. The third step's backward peak of live bytes equals
    the estimate's (before these terms, in bf16: 5.2% and 9.1% under). In fp32: a CPU without bf16 instructions
    takes about 50 s for each bf16 product of the head's input gradient (64 x 32000 by 32000 x 2048), 1 s in
    fp32."""
    pytest.importorskip("deepspeed")
    import deepspeed
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from zeroest.estimator.configs.ds_write import ds_config
    from zeroest.estimator.core.estimate import estimate
    from zeroest.validate.fakepg import close_world, init_fake_world
    from zeroest.validate.memtrack import LiveBytes

    setup = _setup(3, tied, dtype="fp32")
    init_fake_world(0, 4)
    cfg = {**WIDE_HEAD, "tie_word_embeddings": tied}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg),
                                             dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    tracker = LiveBytes(device="cpu")
    try:
        with tracker:
            tracker.adopt(model.parameters())
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                              config=ds_config(setup))
            del model
            for step in range(3):
                ids = torch.randint(0, WIDE_HEAD["vocab_size"], (1, 64))
                loss = engine(input_ids=ids, labels=ids).loss
                with tracker.phase(f"s{step}.bwd"):
                    engine.backward(loss)
                del loss
                engine.step()
    finally:
        close_world()
    predicted = next(p for p in estimate(setup, device="cpu", simulated=True).phases if p.name == "backward")
    assert predicted.peak_bytes == pytest.approx(tracker.phases["s2.bwd"].peak_bytes, rel=1e-3)

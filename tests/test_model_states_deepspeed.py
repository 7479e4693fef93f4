"""The model-state terms equal what real DeepSpeed allocates, category by category, on the CPU.

Each case runs real DeepSpeed 0.19 (``validate.dsprobe``) as rank 0 of an N-rank job on torch's fake process group
(one real gloo pair too), reads every tensor the engine's optimizer holds, and compares the bytes per category with
the estimator's named terms. Exact: DeepSpeed's allocations are deterministic.
"""

from __future__ import annotations

import pytest
from zeroest.estimator.core.architecture import param_tensors, shape_from_config
from zeroest.estimator.core.estimate import model_states
from zeroest.estimator.core.model_states import FP32, flat_group_numel, stage2_grad_numel
from zeroest.estimator.core.setup import DTYPE_BYTES, Optimizer, Parallelism, TrainingSetup, Workload, ZeroConfig
from zeroest.estimator.core.stage3 import partition_numel

pytestmark = pytest.mark.deepspeed

# The probe's tiny models (validate/dsprobe.py ``build_model``), as config.json dicts.
PROBE_CONFIGS = {
    "llama": dict(model_type="llama", vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=False),
    "gpt2": dict(model_type="gpt2", vocab_size=1001, n_embd=100, n_layer=2, n_head=4, n_positions=63),
}
SMALL = dict(reduce_bucket_size=200_000, allgather_bucket_size=200_000)

# One case per ZeRO stage 1-3 runs in the fast lane (1-3 s each once DeepSpeed is imported); stage 0's probes
# (its FP16 optimizers run a step inside ``initialize``, ~5 s each) and the other variants run with the slow tests.
SLOW = pytest.mark.slow
CASES = [
    pytest.param(dict(model="llama", stage=0, dtype="bf16", world_size=4), marks=SLOW),
    pytest.param(dict(model="llama", stage=0, dtype="fp32", world_size=4), marks=SLOW),
    pytest.param(dict(model="llama", stage=1, dtype="bf16", world_size=4), marks=SLOW),
    dict(model="llama", stage=1, dtype="fp16", world_size=8),
    pytest.param(dict(model="llama", stage=2, dtype="bf16", world_size=4), marks=SLOW),
    pytest.param(dict(model="llama", stage=2, dtype="fp32", world_size=4), marks=SLOW),
    dict(model="gpt2", stage=2, dtype="bf16", world_size=8),
    pytest.param(dict(model="llama", stage=2, dtype="bf16", world_size=4, grad_accum=2), marks=SLOW),
    pytest.param(dict(model="llama", stage=3, dtype="bf16", world_size=4), marks=SLOW),
    dict(model="gpt2", stage=3, dtype="bf16", world_size=8),
    pytest.param(dict(model="llama", stage=3, dtype="fp16", world_size=2), marks=SLOW),
]


def setup_for(case: dict) -> TrainingSetup:
    offload = case.get("offload_optimizer", False)
    return TrainingSetup(
        model=shape_from_config(PROBE_CONFIGS[case["model"]], f"probe-{case['model']}"),
        parallel=Parallelism(gpus_per_node=case["world_size"]),
        dtype=case["dtype"],
        optimizer=Optimizer(name="adamw", impl="cpu" if offload else "torch",
                            param_groups=case.get("param_groups", 1)),  # the probe's model_parameters
        zero=ZeroConfig(stage=case["stage"], offload_optimizer="cpu" if offload else "none", **SMALL),
        workload=Workload(micro_batch=1, seq_len=16, grad_accum=case.get("grad_accum", 1), activations="closed-form"),
    )


def categories(record: dict, snapshot: str) -> dict[str, int]:
    return record["snapshots"][snapshot]["categories"]


def ids(case: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in case.items())


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_categories_equal_deepspeed(ds_probe, case):
    record = ds_probe(**case, **SMALL)
    setup = setup_for(case)
    states = model_states(setup, device="cpu")
    numel = sum(t.numel for t in param_tensors(setup.model))
    assert record["model"]["psi"] == numel, "the probe's model is the shape we estimate"
    init, after_step = categories(record, "init"), categories(record, "after_base_step")
    steady = categories(record, "s2m0.step")

    # 16-bit (or fp32) parameters and fp32 master weights, from init on
    if setup.stage == 3:
        b = DTYPE_BYTES[setup.dtype]
        p3 = sum(partition_numel(t.numel, setup.world_size) for t in param_tensors(setup.model))
        assert init["params_16bit"] == b * p3, "partitions only at init"
        assert steady["params_16bit"] == states.params_bytes, "partitions + persistent params whole"
        assert init["grads_16bit"] + init["reduce_buckets"] == states.resident_buffers_bytes
    else:
        assert init["params_16bit"] == states.params_bytes
    assert init["params_fp32_master"] == states.master_weights_bytes

    # optimizer states: at init for stage 0's FP16 optimizers, at the first step otherwise
    if states.states_at_init:
        assert init["optimizer_states"] == states.optimizer_states_bytes
    else:
        assert init["optimizer_states"] == 0
        assert after_step["optimizer_states"] == states.optimizer_states_bytes

    # stage 2's gradient partition: whole parameters overlapping rank 0's slice of the flat group
    if setup.stage == 2:
        grads = categories(record, "s1m0.bwd")["grads_16bit"]
        assert grads == DTYPE_BYTES[setup.dtype] * stage2_grad_numel(setup.model, setup.world_size, rank=0)


def test_flat_group_padding_is_deepspeeds(ds_probe):
    """gpt2's 349,200 parameters at N_d = 7 need padding: the flat group is a multiple of 2 N_d = 14."""
    record = ds_probe(model="gpt2", stage=2, dtype="bf16", world_size=7, **SMALL)
    numel = record["model"]["psi"]
    assert categories(record, "init")["params_16bit"] == 2 * flat_group_numel(numel, 7)
    assert flat_group_numel(numel, 7) == 349_202


@pytest.mark.slow
def test_offload_moves_states_to_the_host(ds_probe):
    """Stage 2 with DeepSpeedCPUAdam: master, states, fp32 gradient partition and a 16-bit copy on the host."""
    case = dict(model="llama", stage=2, dtype="bf16", world_size=4, offload_optimizer=True)
    record = ds_probe(**case, **SMALL)
    setup = setup_for(case)
    states = model_states(setup, device="cpu")
    cats = categories(record, "after_base_step")
    b = DTYPE_BYTES[setup.dtype]
    part = flat_group_numel(sum(t.numel for t in param_tensors(setup.model)), 4) // 4
    assert states.master_weights_bytes == 0 and states.optimizer_states_bytes == 0
    assert cats["params_fp32_master"] + cats["optimizer_states"] + cats["grads_fp32"] == (
        states.host_bytes - b * part - b * max(t.numel for t in param_tensors(setup.model)))
    assert cats["grads_fp32"] == FP32 * part
    assert cats["params_16bit"] == states.params_bytes + b * part


def test_fake_group_rank_equals_real_gloo_rank():
    """The committed gloo probe (2 real ranks) and the estimate agree for both ranks of stage 2."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "data" / "probe"
    case = dict(model="llama", stage=2, dtype="bf16", world_size=2)
    setup = setup_for(case)
    for rank in (0, 1):
        record = json.loads((root / f"gloo_llama_z2_bf16_n2_rank{rank}.json").read_text())
        grads = record["snapshots"]["s1m0.bwd"]["categories"]["grads_16bit"]
        assert grads == 2 * stage2_grad_numel(setup.model, 2, rank=rank)
        assert record["snapshots"]["init"]["categories"]["params_16bit"] == model_states(setup, "cpu").params_bytes


def _probe_rank(rank: int, world_size: int, case: dict) -> dict:
    from zeroest.validate.dsprobe import ProbeConfig, probe

    return probe(ProbeConfig(**case, **SMALL, rank=rank, world_size=world_size))


@pytest.mark.slow
def test_two_real_gloo_ranks_equal_the_estimate():
    """Two real ranks (gloo, spawned processes): each rank's stage-2 gradient partition is the estimate's for it."""
    pytest.importorskip("deepspeed")
    from zeroest.validate.fakepg import run_gloo

    case = dict(model="llama", stage=2, dtype="bf16")
    setup = setup_for({**case, "world_size": 2})
    records = run_gloo(_probe_rank, 2, case, timeout_s=600.0)
    for rank, record in enumerate(records):
        grads = record["snapshots"]["s1m0.bwd"]["categories"]["grads_16bit"]
        assert grads == 2 * stage2_grad_numel(setup.model, 2, rank=rank)
        assert categories(record, "init")["params_16bit"] == model_states(setup, "cpu").params_bytes
        assert categories(record, "after_base_step")["optimizer_states"] == model_states(
            setup, "cpu").optimizer_states_bytes

"""The per-phase timeline against real DeepSpeed on the CPU: phase peaks of live bytes (validate.memtrack.LiveBytes)
over three training steps, rank 0 of an N-rank job on the fake process group.

Init, forward and step peaks of stages 0-2 match within 2%. Two deviations are CPU-only and asserted as the named
term they are: DeepSpeed's CPU engine flattens every gradient once more during a stage-0 backward (b Psi), which the
H100 runs in data/runs do not show (stage 0 there: within 0.4%). Stages 1-2 on the CPU also keep extra gradient copies
in backward (their reduce path), so there the prediction is only required not to exceed the measurement; on the H100
their backward peaks are within 1%. Stage 3 on the CPU fake group gathers each parameter twice; its GPU phases are
checked by the measured runs instead (docs/ACCURACY.md).
"""

from __future__ import annotations

import pytest
from test_model_states_deepspeed import SMALL, setup_for
from zeroest.estimator.core.architecture import count_params, param_tensors
from zeroest.estimator.core.estimate import estimate
from zeroest.estimator.core.flat_group import (
    _partition_copy_excess,
    stage1_partition_copy_bytes,
    stage2_grads_at_head_numel,
)
from zeroest.estimator.core.model_states import flat_group_numel, stage2_grad_numel
from zeroest.estimator.core.reductions import backward_reductions
from zeroest.estimator.core.setup import DTYPE_BYTES, Workload
from zeroest.estimator.core.timeline import embedding_grad_bytes

pytestmark = pytest.mark.deepspeed

# The fast lane keeps the case whose probe test_model_states_deepspeed.py has already run (cached per session).
SLOW = pytest.mark.slow
CASES = [
    pytest.param(dict(model="llama", stage=0, dtype="bf16", world_size=4), marks=SLOW),
    pytest.param(dict(model="llama", stage=0, dtype="fp32", world_size=4), marks=SLOW),
    pytest.param(dict(model="gpt2", stage=0, dtype="bf16", world_size=4), marks=SLOW),
    pytest.param(dict(model="llama", stage=1, dtype="bf16", world_size=8), marks=SLOW),
    pytest.param(dict(model="llama", stage=2, dtype="bf16", world_size=4), marks=SLOW),
    pytest.param(dict(model="llama", stage=2, dtype="bf16", world_size=4, grad_accum=2), marks=SLOW),
    dict(model="gpt2", stage=2, dtype="bf16", world_size=8),
    # the HF Trainer's two groups: the 16-bit gradient partition lives through the first group's step
    dict(model="llama", stage=2, dtype="bf16", world_size=2, param_groups=2),
    dict(model="llama", stage=1, dtype="bf16", world_size=2, param_groups=2),
]


def measured_peaks(record: dict) -> dict[str, int]:
    """Per phase, the largest peak over the steady steps (2 and 3) and every micro-step; init as measured."""
    phases = record["phases"]
    steady = {k: v["peak_bytes"] for k, v in phases.items() if k[:2] in ("s2", "s3")}
    return {
        "init": phases["init"]["peak_bytes"],
        "forward": max(v for k, v in steady.items() if k.endswith(".fwd")),
        "backward": max(v for k, v in steady.items() if k.endswith(".bwd")),
        "step": max(v for k, v in steady.items() if k.endswith(".step")),
    }


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_phase_peaks_match_real_deepspeed(ds_probe, case):
    pytest.importorskip("transformers")
    record = ds_probe(**case, **SMALL)
    setup = setup_for(case)
    setup = setup.with_(workload=Workload(micro_batch=1, seq_len=16, grad_accum=case.get("grad_accum", 1),
                                          activations="traced", loop="trainer"))  # the probe keeps only the loss
    predicted = {p.name: p.peak_bytes for p in estimate(setup, device="cpu").phases}
    measured = measured_peaks(record)
    for phase in ("init", "forward", "step"):
        assert predicted[phase] == pytest.approx(measured[phase], rel=0.02), phase
    b = DTYPE_BYTES[setup.dtype]
    if setup.stage == 0:
        # CPU-only: the engine's gradient all-reduce path flattens all 16-bit gradients once more, after backward,
        # when a tied embedding's summed gradients (2 b V h over the model's, timeline.embedding_grad_bytes) are gone
        flat = b * count_params(setup.model).total
        tied_sum = 2 * embedding_grad_bytes(setup)[1]
        assert measured["backward"] - (predicted["backward"] - tied_sum) == pytest.approx(flat, rel=0.02)
    else:
        # the estimate is the worst rank's, the probe rank 0's: at stage 1 the boundary copy into grads_in_partition
        # of another rank may outgrow rank 0's; at stage 2 the rank whose slice reaches past the (tied) embedding
        # holds its whole gradient partition while the embedding's gradients are summed (rank 0 of gpt2 at N_d 8
        # lies inside the embedding and allocates its partition only afterwards)
        numels = tuple(t.numel for t in param_tensors(setup.model))
        worst_rank_extra = 0
        if setup.stage == 1:
            worst_rank_extra = stage1_partition_copy_bytes(setup) - b * _partition_copy_excess(
                numels, setup.world_size, setup.zero.reduce_bucket_size, 0)
        if setup.stage == 2:
            part = flat_group_numel(sum(numels), setup.world_size) // setup.world_size
            rank0 = stage2_grad_numel(setup.model, setup.world_size, rank=0) if part > numels[0] else 0
            worst_rank_extra = b * (stage2_grad_numel(setup.model, setup.world_size) - rank0)
            # an lm_head larger than the bucket is reduced at its own hook, and the rank whose slice holds it (the
            # last) allocates its whole partition then; rank 0's slice does not reach it at N_d >= 2
            head = len(numels) - 1
            if numels[head] > setup.zero.reduce_bucket_size and part <= sum(numels[:head]):
                worst_rank_extra = max(worst_rank_extra, b * stage2_grads_at_head_numel(numels, head, setup.world_size))
            # and the rank that reduces first holds its grads_in_partition through a later bucket's flatten (b E,
            # core.reductions), which rank 0 makes before its own exists (llama, 2 groups: rank 1 measured 19117340,
            # rank 0 18723628, predicted 19342902)
            worst_rank_extra += b * max((r.flattened_numel for r in backward_reductions(setup)), default=0)
        assert predicted["backward"] - worst_rank_extra <= measured["backward"] * 1.02

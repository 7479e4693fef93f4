"""The headline: ``zeroest predict --params 1.3B --gpus 2``, every stage's terms derived here from named quantities.

Psi is the parameter count of the standard 1.3B shape, N_d = 2 ranks, b = 2 bytes (bf16), FusedAdam (K = 12: 4 bytes
of fp32 master and 8 of Adam states per parameter), DeepSpeed's default ZeRO knobs. The expectations below re-derive
what DeepSpeed 0.19 allocates from its source, independently of ``estimator.core.model_states`` and ``stage3``:

* stage_1_and_2.py ``DeepSpeedZeroOptimizer.__init__``: the flat 16-bit group is padded to a multiple of
  ``nccl_start_alignment_factor * N_d`` = 2 N_d elements (``flatten_dense_tensors_aligned``), each rank owns
  p = P' / N_d of it; ``get_partition_info`` puts every tensor overlapping that slice, whole, in the rank's partition.
* stage3.py / partition_parameters.py ``_partition_param``: every tensor is padded to a multiple of N_d
  (``_padding_size``), a rank holds ceil(n / N_d) of each; tensors below ``stage3_param_persistence_threshold``
  stay whole on every rank (parameter_offload.py ``mark_persistent_parameters``).

Activations are the closed-form profile's named terms (tested against autograd in test_activations.py); here they
only say at which point of backward the peak lies.
"""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner
from zeroest.estimator.catalog.models import standard_shape
from zeroest.estimator.core.activations import closed_form_profile
from zeroest.estimator.core.architecture import count_params, param_tensors
from zeroest.estimator.core.defaults import DEEPSPEED_ZERO_DEFAULTS
from zeroest.estimator.core.overheads import Overheads

from zeroest import Parallelism, TrainingSetup, Workload, ZeroConfig, estimate
from zeroest.cli import app

SHAPE = standard_shape(int(1.3e9))
NUMELS = [t.numel for t in param_tensors(SHAPE)]
PSI = count_params(SHAPE).total
N_D = 2
B = 2  # bf16
MASTER, ADAM = 4, 8  # fp32 master weights; fp32 exp_avg + exp_avg_sq
REDUCE_BUCKET = DEEPSPEED_ZERO_DEFAULTS["reduce_bucket_size"]
CUBLAS = Overheads().cublas_workspace_bytes  # allocated at the first matmul: in every phase after init
ACT = closed_form_profile(SHAPE, 1, 2048, "bf16", "sdpa")
OUTPUTS = B * 1 * 2048 * SHAPE.vocab_size  # --loop custom (the default): the output's logits, b s V, in every phase
STAGES = (0, 1, 2, 3)


def test_psi_is_the_standard_shapes_named_terms():
    """V = 32000, h = 2048, L = 24, I = 5184 (gated), untied: 2 V h + L (4 h^2 + 3 h I + 2 h) + h."""
    vocab, h, layers, inter = SHAPE.vocab_size, SHAPE.hidden_size, SHAPE.num_layers, SHAPE.intermediate_size
    assert (vocab, h, layers, inter) == (32000, 2048, 24, 5184)
    assert PSI == 2 * vocab * h + layers * (4 * h * h + 3 * h * inter + 2 * h) + h == 1_298_237_440
    assert sum(NUMELS) == PSI


def stage12_partition_grad_numel() -> int:
    """Stage 2's ``grads_in_partition`` on the rank that holds most: the tensors overlapping its slice, whole."""
    padded = math.ceil(PSI / (2 * N_D)) * 2 * N_D
    part = padded // N_D
    starts = [sum(NUMELS[:i]) for i in range(len(NUMELS))]
    return max(sum(n for s, n in zip(starts, NUMELS, strict=True) if s < (r + 1) * part and s + n > r * part)
               for r in range(N_D))


def expected(stage: int) -> tuple[str, dict[str, int]]:
    """(phase of the peak, components at that peak) for one stage, from the named terms of the module docstring."""
    head_grads = B * (SHAPE.vocab_size * SHAPE.hidden_size + SHAPE.hidden_size)  # lm_head and final norm
    first_layer_backward = ACT.stack_bytes(False) + ACT.layer_backward_peak_bytes(False)
    head_backward = ACT.stack_bytes(False) + ACT.head_saved_bytes + ACT.grad_logits_bytes \
        + ACT.backward_head_transient_bytes
    if stage == 0:
        # fused_optimizer.py FP16_Optimizer.step: every 16-bit grad (b Psi, alive) cast to fp32 and flattened
        # (4 Psi + 4 Psi at once); the full master and Adam states on every rank
        return "step", dict(params=B * PSI, master_weights=MASTER * PSI, optimizer_states=ADAM * PSI,
                            grads=B * PSI, buffers=CUBLAS, activations=OUTPUTS, temporaries=8 * PSI)
    if stage in (1, 2):
        padded = math.ceil(PSI / (2 * N_D)) * 2 * N_D
        part = padded // N_D
        # backward's first layer, once the first gradient hook has made one reduce bucket (overlap_comm off):
        # stage 1 still holds the head's param.grad, stage 2 has moved it into the bucket
        return "backward", dict(params=B * padded, master_weights=MASTER * part, optimizer_states=ADAM * part,
                                grads=head_grads if stage == 1 else 0, buffers=CUBLAS + B * REDUCE_BUCKET,
                                activations=first_layer_backward + OUTPUTS, temporaries=0)
    threshold = DEEPSPEED_ZERO_DEFAULTS["param_persistence_threshold"]
    p3 = sum(math.ceil(n / N_D) for n in NUMELS)
    persistent = sum(math.ceil(n / N_D) * N_D for n in NUMELS if n < threshold)
    big = sum(n for n in NUMELS if n >= threshold)
    in_flight = DEEPSPEED_ZERO_DEFAULTS["max_live_parameters"] + DEEPSPEED_ZERO_DEFAULTS["prefetch_bucket_size"]
    assert in_flight < big, "the live-parameter limit, not the model, bounds what is gathered"
    # grad_partitions_flat_buffer (b P3) and one ipg bucket (b B_r) from init; max_live + prefetch gathered
    buffers = CUBLAS + B * p3 + B * REDUCE_BUCKET + B * in_flight
    return "backward", dict(params=B * p3 + B * persistent, master_weights=MASTER * p3, optimizer_states=ADAM * p3,
                            grads=0, buffers=buffers, activations=head_backward + OUTPUTS, temporaries=0)


def headline_setup(stage: int) -> TrainingSetup:
    return TrainingSetup(model=SHAPE, parallel=Parallelism(gpus_per_node=N_D), zero=ZeroConfig(stage=stage),
                         workload=Workload(activations="closed-form"))


@pytest.fixture(scope="module")
def cli_docs() -> dict[int, dict]:
    result = CliRunner().invoke(app, ["predict", "--params", "1.3B", "--gpus", "2", "--json"])
    assert result.exit_code == 0, result.output
    docs = json.loads(result.stdout)
    assert [d["stage"] for d in docs] == list(STAGES)
    return {d["stage"]: d for d in docs}


@pytest.mark.parametrize("stage", STAGES)
def test_cli_headline(cli_docs, stage):
    phase, components = expected(stage)
    doc = cli_docs[stage]
    assert doc["n_params"] == PSI
    assert doc["world_size"] == N_D
    assert doc["peak_phase"] == phase
    assert doc["components"] == components
    assert doc["peak_allocated_bytes"] == sum(components.values())
    assert doc["phases"][phase]["peak_bytes"] == max(p["peak_bytes"] for p in doc["phases"].values())


@pytest.mark.parametrize("stage", STAGES)
def test_library_headline(stage):
    phase, components = expected(stage)
    est = estimate(headline_setup(stage))
    assert est.peak_phase == phase
    assert est.components == components
    assert est.peak_allocated_bytes == sum(components.values())


def test_sharded_terms_halve_from_stage_0():
    """ZeRO paper Sec. 5: P_os halves the states at N_d = 2; Psi divides 2 N_d, so stages 1-2 pad nothing."""
    assert PSI % (2 * N_D) == 0
    s0, s1 = expected(0)[1], expected(1)[1]
    assert s1["optimizer_states"] * N_D == s0["optimizer_states"]
    assert s1["master_weights"] * N_D == s0["master_weights"]


def test_stage2_step_holds_the_straddling_tensor_whole():
    """At stage 2's step, ``grads_in_partition`` holds every tensor overlapping the slice: more than Psi / N_d."""
    est = estimate(headline_setup(2))
    step = next(p for p in est.phases if p.name == "step")
    grads = stage12_partition_grad_numel()
    assert PSI // N_D < grads < PSI // N_D + max(NUMELS)
    assert step.components["grads"] == B * grads

"""Stage 1-2 with optimizer offload: the GPU terms of backward and init that offload does not remove
(core/model_states.py ``stage1_offload_grads_bytes``, ``offload_copy_temp_bytes``, the partition clone at init),
against the rows measured on emulated cards (data/runs/h200-cards)."""

import json
from importlib import resources

import pytest
from zeroest.estimator.catalog.models import load_model
from zeroest.estimator.configs.flat import setup_from_dict, setup_from_row
from zeroest.estimator.core.architecture import count_params
from zeroest.estimator.core.estimate import model_states
from zeroest.estimator.core.flat_group import _offload_norm_excess
from zeroest.estimator.core.model_states import flat_group_numel, offload_copy_temp_bytes

QWEN = load_model("qwen2.5-1.5b")
P = count_params(QWEN).total


def _setup(stage, overlap=False, offload="cpu", world=2):
    return setup_from_dict({"world_size": world, "stage": stage, "offload_optimizer": offload, "grad_ckpt": True,
                            "overlap_comm": overlap, "activations": "closed-form"}, model=QWEN)


@pytest.mark.parametrize("stage, overlap, grads", [(1, False, 2 * P), (1, True, 0), (2, False, 0), (2, True, 0)])
def test_stage1_offload_keeps_the_model_gradients_without_overlap(stage, overlap, grads):
    """process_gradients reduces in the hook only with partition_gradients (stage 2) or overlap_comm."""
    assert model_states(_setup(stage, overlap)).grads_bytes == grads


@pytest.mark.parametrize("world", [2, 4, 8])
def test_offload_norm_copy_is_fp64_of_the_largest_in_partition_slice(world):
    """set_norm_for_param_grad_in_gpu: ``.to(get_norm_dtype())`` is torch.double, 8 bytes an element."""
    embed = QWEN.vocab_size * QWEN.hidden_size  # tied: one tensor, first in the flat group
    part = flat_group_numel(P, world) // world
    assert offload_copy_temp_bytes(QWEN, world) == 8 * min(embed, part)
    assert model_states(_setup(2, world=world)).epilogue_bytes == 8 * min(embed, part)
    assert model_states(_setup(2, offload="none", world=world)).epilogue_bytes == 0


def test_stage1_offload_norm_copy_net_of_the_gradients_moved_into_the_bucket():
    """Four tensors (40, 30, 20, 10), N_d 2 (slices [0, 50) and [50, 100)), bucket 60, bf16: rank 0's first
    reduction holds tensor 0 alone, 40 elements moved (80 bytes freed) and a 40-element fp64 copy (320): 240."""
    assert _offload_norm_excess((40, 30, 20, 10), 2, 60, 0, 8, 2) == 8 * 40 - 2 * 40
    # rank 1's slices (20, 20, 10) come in the last reduction, after all 100 elements moved: nothing above them
    assert _offload_norm_excess((40, 30, 20, 10), 2, 60, 1, 8, 2) == 0
    # overlap_comm on: the hooks reduce during backward, no gradient is held: the whole fp64 copy
    assert model_states(_setup(1, overlap=True)).epilogue_bytes == offload_copy_temp_bytes(QWEN, 2)


def _rows():
    path = resources.files("zeroest.data") / "runs" / "h200-cards" / "runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _phase_peak(row, prefix):
    return max(v["peak_allocated_bytes"] for k, v in row["measured"]["phases"].items() if k.startswith(prefix))


@pytest.mark.parametrize("model, stage, phase, measured_prefix", [
    ("qwen2.5-1.5b", 1, "backward", "step0.backward"),  # bP grads + buckets + the fp64 embedding slice, net
    ("qwen2.5-1.5b", 2, "backward", "step1.backward"),  # buckets + the fp64 embedding slice, no gradient held
    ("llama-3-8b", 2, "init", "init"),  # host-flatten branch: bP' + the bp partition clone
])
def test_offload_rows_on_emulated_cards(model, stage, phase, measured_prefix):
    from zeroest.estimator.core.estimate import estimate

    (row,) = [r for r in _rows() if r["setup"]["model"] == model and r["setup"]["stage"] == stage
              and r["setup"]["offload_optimizer"] == "cpu" and r["setup"]["grad_ckpt"]]
    est = estimate(setup_from_row(row["setup"]), simulated=True)
    predicted = next(p.peak_bytes for p in est.phases if p.name == phase)
    assert predicted == pytest.approx(_phase_peak(row, measured_prefix), rel=2e-3)

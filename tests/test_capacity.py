"""DeepSpeed's capacity branch at stage 1-2 init (core/capacity.py), from the card's memory."""

import pytest
from zeroest.estimator.catalog.fit import FIT_MARGIN
from zeroest.estimator.catalog.gpus import parse_gpu
from zeroest.estimator.catalog.models import load_model
from zeroest.estimator.configs.flat import setup_from_dict, setup_to_dict
from zeroest.estimator.core.architecture import count_params, param_tensors
from zeroest.estimator.core.capacity import flatten_decision
from zeroest.estimator.core.estimate import estimate
from zeroest.estimator.core.model_states import flat_group_numel
from zeroest.estimator.core.overheads import Overheads
from zeroest.estimator.units import MiB, round_up

from zeroest.api import build_setup, predict_request

SHAPE = load_model("llama-3-8b")
P = count_params(SHAPE).total
OVH = Overheads()


def _setup(card, stage=2, world=2, **extra):
    return setup_from_dict({"world_size": world, "stage": stage, "offload_optimizer": "cpu", "grad_ckpt": True,
                            "activations": "closed-form", "gpu_memory_bytes": card, **extra}, model=SHAPE)


def test_free_memory_is_card_minus_context_nccl_and_held_params():
    card = parse_gpu("4090").memory_bytes
    d = flatten_decision(_setup(card), P, OVH, real_comm=True)
    held = round_up(2 * P, OVH.reserved_block_bytes)
    assert d.free_bytes == card - OVH.cuda_context_bytes - OVH.nccl_communicator_bytes - held
    assert d.flat_buffer_bytes == 2 * flat_group_numel(P, 2)
    assert not d.on_gpu
    simulated = flatten_decision(_setup(card), P, OVH, real_comm=False)
    assert simulated.free_bytes - d.free_bytes == OVH.nccl_communicator_bytes


@pytest.mark.parametrize("card, on_gpu", [("4090", False), ("a6000", True), ("h100", True), (None, True)])
def test_branch_follows_the_card(card, on_gpu):
    memory = parse_gpu(card).memory_bytes if card else None
    assert flatten_decision(_setup(memory), P, OVH, real_comm=False).on_gpu is on_gpu


def test_boundary_is_two_copies_plus_overheads():
    """The smallest card that flattens on the GPU: F = b P' exactly."""
    need = OVH.cuda_context_bytes + round_up(2 * P, OVH.reserved_block_bytes) + 2 * flat_group_numel(P, 2)
    assert flatten_decision(_setup(need), P, OVH, real_comm=False).on_gpu
    assert not flatten_decision(_setup(need - 1), P, OVH, real_comm=False).on_gpu


def test_small_card_init_holds_one_16bit_copy_not_two():
    small = estimate(_setup(parse_gpu("4090").memory_bytes), simulated=True)
    large = estimate(_setup(None), simulated=True)
    init_small = next(p for p in small.phases if p.name == "init").peak_bytes
    init_large = next(p for p in large.phases if p.name == "init").peak_bytes
    flat = 2 * flat_group_numel(P, 2)
    staging = 2 * max(t.numel for t in param_tensors(SHAPE))  # temp_grad_buffer_for_gpu_offload, after the flatten
    clone = flat // 2  # the 16-bit partition cloned on the GPU before it goes to the host (N = 2)
    assert clone > staging
    assert init_large == 2 * P + flat  # the model's parameters and their flat copy at once
    assert init_small == flat + clone  # the parameters went to the host before the flatten
    assert init_small < init_large
    assert any("flattens there" in note for note in small.assumptions)
    assert any("card unknown" in note for note in large.assumptions)


@pytest.mark.parametrize("stage", [0, 3])
def test_other_stages_have_no_capacity_branch(stage):
    extra = {"offload_optimizer": "none"} if stage == 0 else {}
    setup = _setup(parse_gpu("4090").memory_bytes, stage=stage, **extra)
    assert flatten_decision(setup, P, OVH, real_comm=False) is None
    assert estimate(setup).peak_allocated_bytes == estimate(setup.with_(gpu_memory_bytes=None)).peak_allocated_bytes


def test_gpu_flag_reaches_the_setup_and_the_flat_dict():
    flags = {"gpus_per_node": 2, "offload_optimizer": "cpu", "grad_ckpt": True, "activations": "closed-form"}
    result = predict_request(SHAPE, flags, stage=2, gpu="4090")
    (est,) = result.estimates
    assert est.setup.gpu_memory_bytes == 24564 * MiB
    assert setup_to_dict(est.setup)["gpu_memory_bytes"] == 24564 * MiB
    assert est.phases[0].peak_bytes == 2 * flat_group_numel(P, 2) * 3 // 2  # bP' + bp, see above


def test_grid_value_may_be_a_preset_or_a_size():
    assert _setup("4090").gpu_memory_bytes == 24564 * MiB
    assert _setup("48GB").gpu_memory_bytes == 48 * 10**9
    with pytest.raises(ValueError, match="gpu_memory_bytes"):
        setup_from_dict({"gpu_memory_bytes": "24", "stage": 2}, model=SHAPE, where="grid.yaml:3")
    with pytest.raises(ValueError, match="--gpu"):
        _setup(-5)


def test_predict_says_when_only_expandable_segments_make_the_setup_fit():
    # the hint follows the two verdicts exactly: default allocator short, expandable segments within the margin
    from zeroest.estimator.catalog.fit import fit_verdict

    shape, hinted = load_model("qwen2.5-1.5b"), 0
    for micro_batch in (1, 2, 3, 4, 6):
        flags = {"gpus_per_node": 2, "grad_ckpt": True, "seq_len": 1024, "micro_batch": micro_batch,
                 "activations": "closed-form"}
        result = predict_request(shape, flags, stage=2, gpu="4090")
        (est,), (fit,) = result.estimates, result.fits
        other = estimate(est.setup.with_(expandable_segments=True))
        expected = not fit.fits and fit_verdict(other.device_bytes, fit.gpu).fits
        lines = [w for w in result.warnings if "expandable_segments:True" in w]
        assert bool(lines) == expected, micro_batch
        if expected:
            hinted += 1
            assert f"by {fit.short_bytes / 2**30:.1f} GiB" in lines[0]
    assert hinted, "no micro-batch lands between the two verdicts: the test checks nothing"


def test_plan_names_the_first_pick_with_expandable_segments_when_nothing_fits_without():
    # ZeRO-2 without offload, 1.5B on two 24 GB cards: short with the default allocator's reserve (the first step's
    # flat fp32 buffers stacked on its free cache), within the budget once expandable segments keep f_x of it
    from zeroest.estimator.plan.search import budget_bytes

    from zeroest.api import plan_request

    shape = load_model("qwen2.5-1.5b")
    flags = {"gpus_per_node": 2, "seq_len": 1024, "activations": "closed-form"}
    answer = plan_request(shape, flags, gpu="4090", stages=[2], offloads=["none"], host_ram="256GB")
    assert answer.plan.best is None
    (note,) = [n for n in answer.notes if "expandable_segments:True" in n]
    assert note.endswith("ZeRO-2, checkpointing at micro-batch 1 fits (plan with --expandable-segments)")
    chosen = build_setup(shape, {**flags, "grad_ckpt": True, "expandable_segments": True}, stage=2)
    card = parse_gpu("4090").memory_bytes
    assert estimate(chosen.with_(gpu_memory_bytes=card)).device_bytes <= budget_bytes(card, FIT_MARGIN)
    with_flag = plan_request(shape, {**flags, "expandable_segments": True}, gpu="4090", stages=[2],
                             offloads=["none"], host_ram="256GB")
    assert with_flag.plan.best is not None and not any("expandable_segments:True" in n for n in with_flag.notes)

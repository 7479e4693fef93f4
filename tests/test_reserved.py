"""The reserved-memory model by caching-allocator terms (estimator/core/reserved.py): every expectation is the
module docstring's formula worked by hand on named byte counts."""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_report_support import closed_form  # noqa: F401
from zeroest.estimator.core.overheads import Overheads
from zeroest.estimator.core.reserved import NO_BLOCKS, RESERVED_TERMS, ReservedFacts, reserved_terms
from zeroest.estimator.units import GiB, MiB, round_up

OH = Overheads(reserved_fraction_of_peak=0.05, reserved_fraction_of_activations=0.1, reserved_reuse_fraction=0.5,
               reserved_fraction_of_offload_grads=0.5, reserved_fraction_of_gathered=0.25, reserved_fixed_bytes=0)


def _phases(init_temporaries_gib: float = 2.0) -> dict[str, dict[str, float]]:
    """A ZeRO-1-like step in GiB: 16-bit params 2, fp32 master 4, Adam states 8 created by the first step (none at
    init), activations 6 (forward) and 7 (backward), the step's 1 GiB of gradients and 4 GiB of temporaries."""
    held = {"params": 2 * GiB, "master_weights": 4 * GiB}
    return {
        "init": {**held, "temporaries": init_temporaries_gib * GiB},
        "forward": {**held, "optimizer_states": 8 * GiB, "activations": 6 * GiB},
        "backward": {**held, "optimizer_states": 8 * GiB, "activations": 7 * GiB},
        "step": {**held, "optimizer_states": 8 * GiB, "grads": 1 * GiB, "temporaries": 4 * GiB},
    }


FLAT = ReservedFacts(contiguous_step=True, contiguous_block_bytes=4 * GiB, largest_free_block_bytes=1 * GiB,
                     offload_grad_bytes=0, gathered_bytes=0)
"""Flat 4 GiB step buffers and no freed block that large: nothing of the first step is reused."""


def test_terms_sum_to_the_total_rounded_to_a_segment():
    terms = reserved_terms(_phases(), FLAT, OH)
    assert sum(terms.components().values()) == pytest.approx(terms.total_bytes, abs=len(RESERVED_TERMS))
    assert terms.total_bytes % OH.reserved_block_bytes == 0
    assert 0 <= terms.rounding < OH.reserved_block_bytes


def test_the_first_step_stacks_its_flat_buffers_on_the_first_micro_step():
    # first micro-step: backward (21 GiB) less the 8 GiB of states the first step creates = 13, + 0.1 * 7 GiB
    # first step: temporaries 4 + lazily created states 8 + gradients that appear in the step 1 = 13, no reuse
    terms = reserved_terms(_phases(), FLAT, OH)
    assert terms.set_by == "first step"
    assert terms.peak == 13 * GiB
    assert terms.activation_cache == pytest.approx(0.7 * GiB)
    assert terms.first_step_buffers == 13 * GiB
    body = 13 * GiB + 0.7 * GiB + 13 * GiB
    assert terms.fraction_of_peak == pytest.approx(0.05 * body)
    assert terms.total_bytes == round_up(int(1.05 * body) + 1, 2 * MiB)


def test_a_freed_block_as_large_as_the_flat_buffer_lets_the_step_reuse_the_cache():
    # U = R_first - live after backward = 13.7 - (19 - 4 - 8) = 6.7 GiB; r U = 3.35 GiB reused
    fits = replace(FLAT, largest_free_block_bytes=4 * GiB)
    terms = reserved_terms(_phases(), fits, OH)
    assert terms.first_step_buffers == pytest.approx((13 - 0.5 * 6.7) * GiB)


def test_steady_state_sets_the_peak_when_the_step_allocates_nothing_flat():
    # stage 0 / offload: no flat step buffers; the steady backward (21 GiB) + 0.1 * 7 GiB
    terms = reserved_terms(_phases(), NO_BLOCKS, OH)
    assert terms.set_by == "steady" and terms.first_step_buffers == 0
    assert terms.peak == 21 * GiB and terms.activation_cache == pytest.approx(0.7 * GiB)
    assert terms.total_bytes == round_up(int(1.05 * 21.7 * GiB) + 1, 2 * MiB)


def test_an_init_reserve_larger_than_the_first_micro_step_carries_into_the_first_step():
    # init 6 + 14 GiB = 20 GiB > 13.7: the first step's 13 GiB stack on the init reserve, with no fraction (init's
    # segments are the model's own tensors): 33 GiB > 1.05 * (13.7 + 13)
    terms = reserved_terms(_phases(init_temporaries_gib=14.0), FLAT, OH)
    assert terms.set_by == "init" and terms.peak == 20 * GiB and terms.activation_cache == 0
    assert terms.first_step_buffers == 13 * GiB and terms.fraction_of_peak == 0
    assert terms.total_bytes == 33 * GiB


def test_init_alone_sets_the_peak_when_nothing_later_reaches_it():
    terms = reserved_terms(_phases(init_temporaries_gib=60.0), NO_BLOCKS, OH)
    assert terms.set_by == "init" and terms.peak == 66 * GiB and terms.fraction_of_peak == 0
    assert terms.total_bytes == 66 * GiB


@pytest.mark.parametrize(("offload_gib", "gathered_gib"), [(3.0, 0.0), (0.0, 2.0)])
def test_offload_gradients_and_gathered_parameters_add_their_fractions(offload_gib, gathered_gib):
    facts = replace(NO_BLOCKS, offload_grad_bytes=int(offload_gib * GiB), gathered_bytes=int(gathered_gib * GiB))
    terms = reserved_terms(_phases(), facts, OH)
    assert terms.offload_grad_cache == pytest.approx(0.5 * offload_gib * GiB)
    assert terms.gathered_cache == pytest.approx(0.25 * gathered_gib * GiB)
    base = reserved_terms(_phases(), NO_BLOCKS, OH)
    assert terms.unrounded_bytes == pytest.approx(base.unrounded_bytes + 1.05 * (0.5 * offload_gib
                                                                                + 0.25 * gathered_gib) * GiB)


def test_the_loss_s_fp32_logits_block_adds_its_fraction_to_the_micro_step_and_steady_peaks():
    # f_L 0.5 of a 1.5 GiB fp32 logits block: 0.75 GiB in the steady candidate (21 + 0.7 + 0.75 GiB) and in the
    # first step's (13 + 0.7 + 0.75 + 13 GiB), each with f_p on top
    oh = replace(OH, reserved_fraction_of_logits=0.5)
    logits = int(1.5 * GiB)
    steady = reserved_terms(_phases(), replace(NO_BLOCKS, logits_block_bytes=logits), oh)
    assert steady.set_by == "steady" and steady.logits_cache == pytest.approx(0.75 * GiB)
    assert steady.unrounded_bytes == pytest.approx(1.05 * (21 + 0.7 + 0.75) * GiB)
    first = reserved_terms(_phases(), replace(FLAT, logits_block_bytes=logits), oh)
    assert first.set_by == "first step" and first.logits_cache == pytest.approx(0.75 * GiB)
    assert first.unrounded_bytes == pytest.approx(1.05 * (13 + 0.7 + 0.75 + 13) * GiB)


@pytest.mark.parametrize("frozen_gib", [6.0, 30.0])
def test_the_fraction_of_peak_leaves_out_the_frozen_weights_resident_from_the_load(frozen_gib):
    # steady 21.7 GiB, of which F_r frozen: f_p acts on 21.7 - F_r, and on nothing once F_r passes the sum
    facts = replace(NO_BLOCKS, frozen_resident_bytes=int(frozen_gib * GiB))
    terms = reserved_terms(_phases(), facts, OH)
    assert terms.fraction_of_peak == pytest.approx(0.05 * max(0.0, 21.7 - frozen_gib) * GiB)
    assert terms.unrounded_bytes == pytest.approx((21.7 + 0.05 * max(0.0, 21.7 - frozen_gib)) * GiB)


@pytest.mark.usefixtures("closed_form")
@pytest.mark.parametrize(("stage", "world", "quant"), [(2, 2, "none"), (3, 4, "none"), (2, 2, "nf4")])
def test_frozen_resident_bytes_are_the_base_weights_whole_at_stages_0_to_2_and_a_partition_at_stage_3(
        stage, world, quant):
    from test_report_support import make_setup
    from zeroest.estimator.core.adapters import Adapters
    from zeroest.estimator.core.model_states import trained
    from zeroest.estimator.core.qlora import base_bytes, frozen_resident_bytes

    setup = make_setup("gpt2", stage, world)
    setup = replace(setup, adapters=Adapters(lora_rank=8, base_quant=quant))
    numel = trained(setup).frozen_numel
    frozen = 2 * numel  # bf16
    quant_saved = (lambda q, plain: plain - q)(*base_bytes(setup)) if quant != "none" else 0
    expected = frozen // world if stage == 3 else frozen - quant_saved
    assert frozen_resident_bytes(setup, numel, 2) == expected > 0
    full = make_setup("gpt2", stage, world)
    assert frozen_resident_bytes(full, trained(full).frozen_numel, 2) == 0


@pytest.mark.usefixtures("closed_form")
def test_estimate_reports_the_terms_and_the_block_sizes():
    from test_report_support import make_setup
    from zeroest.estimator.core.estimate import estimate

    setup = make_setup("gpt2", 2, 4)  # micro-batch 2 x 512 tokens, bf16
    e = estimate(setup)
    assert e.peak_reserved_bytes == e.reserved.total_bytes >= e.peak_allocated_bytes
    assert e.to_dict()["reserved_components"] == e.reserved.components()
    facts = e.reserved_facts
    vocab, hidden = setup.model.vocab_size, setup.model.hidden_size
    # the fp32 logits, 4 * b * s * V bytes, outgrow the largest parameter (the embedding, 2 * V * h bytes)
    assert facts.largest_free_block_bytes == 4 * 2 * 512 * vocab > 2 * vocab * hidden
    assert facts.contiguous_step and facts.contiguous_block_bytes == e.components["master_weights"]
    assert facts.offload_grad_bytes == 0 and facts.gathered_bytes == 0
    assert facts.logits_block_bytes == 4 * 2 * 512 * vocab and facts.frozen_resident_bytes == 0
    assert e.reserved.logits_cache == pytest.approx(Overheads().reserved_fraction_of_logits * 4 * 2 * 512 * vocab)


@pytest.mark.usefixtures("closed_form")
def test_a_cpu_estimate_reserves_its_peak():
    from test_report_support import make_setup
    from zeroest.estimator.core.estimate import estimate

    e = estimate(make_setup("gpt2", 1, 2), device="cpu")
    assert e.peak_reserved_bytes == e.peak_allocated_bytes


@pytest.mark.parametrize(("comm_peers", "outside_mib"), [(None, 788), (3, 788 + 462)])
def test_a_named_card_caps_the_reserve_at_what_it_leaves_the_allocator(comm_peers, outside_mib):
    # uncapped: 1.05 * 26.7 GiB ~ 28 GiB; a 26 GiB card leaves the allocator 26 GiB - C (- N_c with real NCCL),
    # floored to a 2 MiB segment; the peak allocation (backward, 21 GiB) fits under it, so the run retries there
    card = replace(FLAT, card_bytes=26 * GiB, comm_peers=comm_peers)
    terms = reserved_terms(_phases(), card, OH)
    limit = (26 * 1024 - outside_mib) * MiB
    assert terms.total_bytes == limit
    assert terms.card_limit == pytest.approx(limit - reserved_terms(_phases(), FLAT, OH).total_bytes)
    assert sum(terms.components().values()) == pytest.approx(terms.total_bytes, abs=len(RESERVED_TERMS))


@pytest.mark.parametrize("card_gib", [20, 40])
def test_a_card_caps_nothing_below_the_peak_allocation_or_above_the_reserve(card_gib):
    # 20 GiB < the 21 GiB backward peak: the run runs out of memory, the reserve stays the demand; 40 GiB: room
    terms = reserved_terms(_phases(), replace(FLAT, card_bytes=card_gib * GiB), OH)
    assert terms.card_limit == 0
    assert terms.total_bytes == reserved_terms(_phases(), FLAT, OH).total_bytes


def test_the_init_cache_lifts_the_init_reserve_and_the_first_step_stacks_only_its_own_block():
    # init 6 + 14 GiB = 20 GiB peak, K = 3 GiB cached beside it: R_init = 23 GiB > 13.7 (first micro-step); the
    # first step's only new block is step_new_bytes = 4 GiB (no freed block that large, B_L 1 GiB): 27 GiB >
    # 1.05 * 21.7 (steady) and 1.05 * (13.7 + 4) (first step)
    facts = replace(FLAT, init_cached_bytes=3 * GiB, step_new_bytes=4 * GiB)
    terms = reserved_terms(_phases(init_temporaries_gib=14.0), facts, OH)
    assert terms.set_by == "init" and terms.peak == 20 * GiB and terms.init_cache == 3 * GiB
    assert terms.first_step_buffers == 4 * GiB
    assert terms.total_bytes == 27 * GiB


@pytest.mark.usefixtures("closed_form")
@pytest.mark.parametrize(("impl", "cached"), [("fused", True), ("torch", False)])
def test_stage0_fused_adam_caches_three_16bit_copies_at_init(impl, cached):
    # FP16_Optimizer (FusedAdam, bf16): K = 3 b P_t (clones, the model's own tensors, the master's clone) and one
    # flat fp32 gradient of 4 P_t in the step; FP16_UnfusedOptimizer (torch AdamW): neither
    from test_report_support import make_setup
    from zeroest.estimator.core.estimate import estimate
    from zeroest.estimator.core.setup import Optimizer

    setup = replace(make_setup("gpt2", 0, 1), optimizer=Optimizer(impl=impl))
    e = estimate(setup)
    facts = e.reserved_facts
    assert facts.init_cached_bytes == (3 * 2 * e.n_params if cached else 0)
    assert facts.step_new_bytes == (4 * e.n_params if cached else 0)
    assert facts.contiguous_step is cached


@pytest.mark.usefixtures("closed_form")
@pytest.mark.parametrize(("stage", "world"), [(2, 4), (3, 4), (3, 8)])
def test_offloaded_gradients_through_the_copy_stream_are_whole_at_stage2_a_partition_at_stage3(stage, world):
    # stage_1_and_2 copies every rank's whole 16-bit gradients (b P); stage3.partition_grads only the rank's
    # reduce-scattered partition (b P / N_d)
    from test_report_support import make_setup
    from zeroest.estimator.core.estimate import estimate
    from zeroest.estimator.core.setup import Optimizer, ZeroConfig

    setup = replace(make_setup("gpt2", stage, world), zero=ZeroConfig(stage=stage, offload_optimizer="cpu"),
                    optimizer=Optimizer(impl="cpu"))
    e = estimate(setup)
    whole = 2 * e.n_params
    assert e.reserved_facts.offload_grad_bytes == (whole // world if stage == 3 else whole)


@pytest.mark.parametrize(("world", "offload", "expected"), [
    (1, False, 2 * 10**9 + 2 * 10**9),  # the clone b P_t + the whole freed model (X = 8 P_t passes b P_t)
    (2, False, 10**9 + 2 * 10**9),  # (1 + 1/N_d) b P_t
    (8, False, 250_000_000 + 10**9),  # X = 8 P_t / 8 = b P_t / 2 reuses half the freed model: 0.625 b P_t
    (16, False, 500_000_000),  # the clone (1.25e8) fits the freed largest tensor (2e8); X = 5e8 does not
    (2, True, 10**9),  # offload: master and gradient on the host, only the clone b P_t / N_d
])
def test_stage12_init_cache_is_the_freed_model_and_clone_that_the_later_requests_pass(world, offload, expected):
    from zeroest.estimator.core.flat_group import stage12_init_cache

    assert stage12_init_cache(10**9, world, 2, 2 * 10**8, offload=offload) == expected


@pytest.mark.usefixtures("closed_form")
@pytest.mark.parametrize(("groups", "cached"), [(1, True), (2, False)])
def test_stage12_init_cache_only_with_one_parameter_group(groups, cached):
    # DeepSpeed's empty_cache() before each group's flattening hands the earlier groups' freed blocks back
    from test_report_support import make_setup
    from zeroest.estimator.core.estimate import estimate
    from zeroest.estimator.core.setup import Optimizer

    setup = replace(make_setup("gpt2", 2, 2), optimizer=Optimizer(param_groups=groups))
    facts = estimate(setup).reserved_facts
    assert (facts.init_cached_bytes > 0) is cached
    assert facts.init_freed_block_bytes == facts.contiguous_block_bytes > 0


def test_the_first_step_stacked_on_the_init_takes_the_init_s_freed_flat_block_first():
    # as above, but the init also frees one 4 GiB flat block (ZeRO-1/2's zero gradient): the step's 4 GiB block
    # takes it, nothing new: 23 GiB (init) > 1.05 * 21.7 (steady)
    facts = replace(FLAT, init_cached_bytes=3 * GiB, step_new_bytes=4 * GiB, init_freed_block_bytes=4 * GiB)
    terms = reserved_terms(_phases(init_temporaries_gib=14.0), facts, OH)
    assert terms.set_by == "init" and terms.first_step_buffers == 0
    assert terms.total_bytes == 23 * GiB


@pytest.mark.parametrize("card_gib", [None, 22])
def test_expandable_segments_keep_a_share_of_the_default_free_cache_in_20_mib_pages(card_gib):
    # P = the backward peak, 2 + 4 + 8 + 7 = 21 GiB; the default allocator's terms reserve R (the first step's
    # 13 GiB of flat buffers stacked on the first micro-step, test above); expandable segments keep f_x (R - P)
    # of it beyond P, rounded up to a 20 MiB page (kLargeBuffer)
    oh = replace(OH, reserved_fraction_expandable=0.5)
    default = reserved_terms(_phases(), FLAT, oh)
    facts = replace(FLAT, expandable_segments=True, card_bytes=(card_gib or 0) * GiB)
    terms = reserved_terms(_phases(), facts, oh)
    holes = 0.5 * (default.unrounded_bytes - 21 * GiB)
    assert terms.peak == 21 * GiB and terms.expandable_holes == pytest.approx(holes)
    assert terms.first_step_buffers == terms.activation_cache == terms.fraction_of_peak == 0
    assert terms.set_by == "expandable (first step)"
    uncapped = round_up(int(21 * GiB + holes) + 1, 20 * MiB)
    if card_gib is None:
        assert terms.total_bytes == uncapped < default.total_bytes and terms.card_limit == 0
    else:  # 22 GiB less the 788 MiB context leaves the allocator less than asked: capped there
        assert terms.total_bytes == (22 * 1024 - 788) * MiB < uncapped
    assert sum(terms.components().values()) == pytest.approx(terms.total_bytes, abs=len(RESERVED_TERMS))


def test_an_estimate_with_expandable_segments_names_the_allocator_in_its_facts():
    from test_report_support import make_setup
    from zeroest.estimator.core.estimate import estimate

    setup = make_setup("gpt2", 2, 4)
    default, expandable = estimate(setup), estimate(setup.with_(expandable_segments=True))
    assert not default.reserved_facts.expandable_segments and expandable.reserved_facts.expandable_segments
    assert expandable.peak_allocated_bytes == default.peak_allocated_bytes  # only the reserve depends on it
    f_x, peak = Overheads().reserved_fraction_expandable, default.peak_allocated_bytes
    assert expandable.peak_reserved_bytes == round_up(
        int(peak + f_x * (default.reserved.unrounded_bytes - peak)) + 1, 20 * MiB)

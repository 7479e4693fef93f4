"""Peak reserved memory (``torch.cuda.max_memory_reserved()``) by named caching-allocator terms, phase by phase.

What the allocator does (c10/cuda/CUDACachingAllocator.cpp, torch 2.11, ``expandable_segments`` off, the default):

* a request over 1 MiB (``kSmallSize``) is served from the large pool: ``get_free_block`` takes the smallest cached
  free block at least as large as the request (best fit), splitting it; only when no cached block is large enough
  does ``alloc_block`` cudaMalloc a new segment (requests under 10 MiB get a 20 MiB ``kLargeBuffer`` segment,
  larger ones their size rounded up to 2 MiB, ``kRoundLarge``);
* ``free`` returns a block to the cache and merges it with free neighbours of the same segment
  (``try_merge_blocks``); segments are given back to the driver only on ``empty_cache`` or when a cudaMalloc
  fails (``release_cached_blocks``, counted in ``num_alloc_retries``).

So reserved memory only grows, and it grows whenever a phase asks for a block larger than every free block the
earlier phases left. A training run goes init -> first micro-step (forward, backward) -> first ``engine.step()``
-> steady steps. The terms, in bytes (symbols used below):

* ``R_init = I + K``: the init peak (``deepspeed.initialize``; the model's own tensors it frees stay cached, in
  pieces the later activations reuse) and K (``init_cache``), blocks the init frees before its peak that are too
  small for every later request of the init, so that the init's later blocks are new segments beside them.
  Modelled where the sequence is fixed, stage 0 in 16 bits with FusedAdam (runtime/fp16/fused_optimizer.py
  ``FP16_Optimizer.__init__``; P_t the trainable parameters): ``[p.clone() for p in group]`` (b P_t, one block
  per tensor) is concatenated by ``_flatten_dense_tensors`` and dropped, the model's own tensors (b P_t, per
  tensor) are re-pointed into the flat copy, and ``fp16_groups_flat[i].clone().float()`` drops its b P_t clone;
  the requests that follow are 4 P_t each (the ``.float()`` master, ``initialize_optimizer_states``'s zero
  gradient, FusedAdam's ``exp_avg`` and ``exp_avg_sq``), larger than any of those blocks: K = 3 b P_t.
  Measured on the 9 such rows of data/runs/h100-default and h100-holdout: init reserved - init peak allocated =
  3.04-3.18 b P_t. ZeRO-1/2 with one parameter group: the model's own tensors and the 16-bit clone of the
  partition, freed before the fp32 master and its gradient (``stage12_init_cache``). Elsewhere K = 0.
* ``R_first = max(R_init, F + f_a A_F + f_o G_o + f_g W + f_L B_log)``: the first micro-step, before the
  optimizer states exist (F = the larger of the forward and backward peaks less the states the first step
  creates lazily, A_F its activations). Activations are many tensors of many sizes, freed in another order
  than made: the cache keeps a fraction ``f_a`` of them as free pieces too small for the next request
  (``reserved_fraction_of_activations``).
  With optimizer offload, each 16-bit gradient (G_o = b P bytes over backward) is copied to the host on another
  stream (stage_1_and_2.py ``copy_grads_in_partition``, ``_record_gradient_stream``), so its block is not reused
  until that copy ends (``record_stream``): ``f_o`` (``reserved_fraction_of_offload_grads``); at stage 3 only
  the rank's partition, G_o = b P / N_d, goes that way (stage3.py ``partition_grads``). Stage 3 gathers
  each module's parameters into blocks of their own sizes (W = gathered bytes): ``f_g``
  (``reserved_fraction_of_gathered``). The loss upcasts the logits (transformers loss/loss_utils.py
  ``ForCausalLMLoss``: ``logits = logits.float()``) and cross-entropy's backward makes the fp32 gradient of the
  same shape: blocks of B_log = 4 bytes x batch x sequence x vocabulary each, one tensor apiece, the largest
  requests of the micro-step, made when most activations are live, so that the cache rarely has a free block that
  large and the segment cut for one stays reserved, beside the smaller blocks that later reuse it: ``f_L``
  (``reserved_fraction_of_logits``). Seen on the H200 (benchmarks/snapshot_peak.py, users2 row 5, qwen2.5-7b at
  1 x 3072): a 1782 MiB segment, 4 x 3072 x 152064 bytes exactly, cut in step 1's backward; fitted f_L is about
  one such block, and with it f_a goes to about 0 (the activations' many small pieces are reused).
* ``R_step = R_first + max(0, C - r U)`` (R_first without R_init here; see R below): the first
  ``engine.step()`` allocates large flat buffers (C): the
  optimizer states torch creates at the first step (torch/optim/adam.py ``_init_group``:
  ``torch.zeros_like(p)`` on the flat fp32 partition), the fp32 gradient partition (stage_1_and_2.py ``step``
  ``single_partition_of_fp32_groups[i].grad``; stage3.py ``_prepare_fp32_grad_for_sub_group``) and the
  optimizer's temporaries. Each is one contiguous block of the partition's size (B_c). The free cache after
  backward (U = R_first - what lives after backward) is the pieces earlier phases freed: they can hold such a
  block only when a single freed piece is at least as large (B_L: the fp32 logits, ``ForCausalLMLoss``'s
  ``logits.float()`` and the saved log-softmax, 4 bytes x batch x sequence x vocabulary each; or the model's
  largest parameter tensor, freed when init flattened or partitioned a model that sat whole on the GPU); then
  a fraction ``r`` of U is reused (``reserved_reuse_fraction``), else none. Stage 0 and optimizer offload
  allocate no such block on the GPU, except stage 0 with FusedAdam in 16 bits: ``FP16_Optimizer.step`` converts
  each gradient to fp32 (4 n per tensor, pieces the init's cached blocks hold) and ``_flatten_dense_tensors``
  them into one block of B_c = 4 P_t, the only new block of that step (``step_new_bytes``, in place of C).
* ``R_steady = P + f_a A_P + f_o G_o + f_g W + f_L B_log``: the steady phases with every state in place (P the
  largest peak of forward, backward and step, A_P its activations; init is ``R_init``'s).

``R = max(R_init + C', max(R_step, R_steady) + f_p (that - F_r) + c)``, rounded up to the 2 MiB segment
granularity, with ``f_p`` (``reserved_fraction_of_peak``) and ``c`` (``reserved_fixed_bytes``) for what the terms
leave out. F_r (``frozen_resident_bytes``) is the frozen weights the model loaded (LoRA's base): one tensor each,
allocated before anything is freed and never freed, they leave no pieces, so ``f_p`` leaves them out (with f_p on
them, LoRA rows without checkpointing were over by 4-9% on reserved, the activations' cache alone matching what
they measured beyond the allocation). C' is
the first step's unreused buffers where the init reserve is what they stack on (init's segments are the model's
own tensors, no fragmentation beyond them), less a flat block the init freed at its end (ZeRO-1/2's zero fp32
gradient, B_c, ``init_freed_block_bytes``), else 0.

Where the request sequence is built (``ReservedFacts.sequence_reserved_bytes``: a setup that
``core.requests.sequence_gap`` covers, traced with torch) none of those terms is needed: the reserve is a function of
the requests alone, which ``core.requests`` (at stage 3 ``core.zero3_requests``, at stage 0 ``core.zero0_requests``)
writes in order and replays through the allocator model. ``R_seq`` is the replay's peak over the run (at least P, the
largest phase peak), rounded to the segment; on a named card the replay runs under the card's limit L (below), retrying
as the allocator does, and one that fails even so predicts the OOM with the reserve it asks for. Checked on rank 0 of
simulated jobs and on single-GPU runs; on a real NCCL group of two ranks or more (``sequence_floor``) the reserve is the
larger of R_seq and the terms above, since the sequence leaves out what the communication streams hold back. Of 16
setups measured after its rules were fixed (data/runs/h200-seqcheck), 13 came within 0.6%, 15 with two later fixes, one
over by 7.3%; of 15 near a 24 GB card's limit, it told which would run out of memory on 13 (docs/DEVICE_RUNS.md, tenth
session); at stage 3, 14 held-out setups (h200-s3check, h200-s3check2) within a median of 0.9%, at most 4.7% (thirteenth
session); at stage 0, 27 rows with AdamW within 0.2% (fourteenth session; fp16 at stages 2-3, 5 rows within 0.1%).

With expandable segments (``TrainingSetup.expandable_segments``, ``PYTORCH_CUDA_ALLOC_CONF=
expandable_segments:True``) the request sequence, where built, is replayed through the allocator model's expandable
mode (``core.allocator``); elsewhere none of the terms above applies. The large pool of each stream is then one range of
virtual addresses that maps physical pages of 20 MiB (``kLargeBuffer``; ``ExpandableSegment::map`` rounds to its
``segment_size_``) as requests need them: a request still takes the best-fitting free block first
(``get_free_block``), and one that finds none maps pages at the end of the range, joined to the free block just
before them (``find_expandable_block``, ``try_allocate_expandable_block``). A free block at the end of the range
is therefore never left behind by a larger request, and no segment boundary splits free space: what stays
reserved beyond the allocation is the free blocks between live ones at the peak, other streams' ranges and the
page rounding. Those holes come from the same frees in the same order as the default allocator's cached
blocks (the model's tensors freed at the flatten, activations freed in backward, then the first step's flat
buffers larger than any of them), only fewer of them stay stranded: ``R_x = P + f_x (R - P)``, rounded up to the
20 MiB page, where R is the default allocator's reserve of the terms above before rounding and the card's cap,
P the largest phase peak (init included) and ``f_x`` (``reserved_fraction_expandable``) the share of the
default's free cache that stays reserved. On 21 rows run both ways (data/runs/h200-expandable) the expandable
reserve beyond the peak was 0.02-1.1 times the default model's (0.66 by least squares; ``f (P - F_r)`` missed by
up to 18%); predicted before they ran, 19 LoRA rows (h200-expandable2) were within 1.1% median, 8.1% max, and 20
of full fine-tuning (h200-expandable3) within 3.9% and 13.2% (docs/DEVICE_RUNS.md).

The card caps it (``card_limit``): where the setup names the card (M bytes), the allocator can hold at most
``L = M - C - N_c`` (C the CUDA context, N_c the NCCL communicator and buffers,
``overheads.allocator_limit_bytes``; on an emulated card ``torch.cuda.set_per_process_memory_fraction`` sets the
same L). ``alloc_block`` fails a cudaMalloc
that would pass L (``allowed_memory_maximum`` under a fraction, the driver's own OOM on a real card); ``malloc``
then calls ``release_available_cached_blocks`` and, failing that, ``release_cached_blocks`` (every free cached
segment back to the driver, ``num_alloc_retries`` += 1) and tries again. So a run that finishes never reserves more
than L: ``R_card = min(R, floor(L / s) s)`` (s the 2 MiB segment), applied only where the predicted peak allocation
itself fits under L (above it the run runs out of memory, and R stays the demand that says so). Measured on the
emulated cards of data/runs/h200-cards: every finished run that retried peaked at 0.89-1.00 L, none above.
Every coefficient is an ``Overheads`` parameter, fitted by ``zeroest report --fit``. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from zeroest.estimator.core.flat_group import stage12_init_cache
from zeroest.estimator.core.overheads import allocator_limit_bytes
from zeroest.estimator.core.qlora import frozen_resident_bytes
from zeroest.estimator.units import round_up_bytes

if TYPE_CHECKING:
    from zeroest.estimator.core.model_states import ModelStates
    from zeroest.estimator.core.overheads import Overheads
    from zeroest.estimator.core.profile import ActivationProfile
    from zeroest.estimator.core.setup import TrainingSetup

FP32 = 4

RESERVED_TERMS: tuple[str, ...] = ("peak", "init_cache", "activation_cache", "offload_grad_cache", "gathered_cache",
                                   "logits_cache", "first_step_buffers", "fraction_of_peak", "expandable_holes",
                                   "sequence_cache", "fixed", "rounding", "card_limit")
"""The named terms of the predicted peak reserved; they sum to it (``ReservedTerms.total_bytes``)."""


@dataclass(frozen=True, kw_only=True)
class ReservedFacts:
    """What the reserved model needs beyond the phases' components: sizes of single blocks, and bytes that pass
    through the allocator without being in any phase's peak."""

    contiguous_step: bool
    """The first ``engine.step()`` allocates flat fp32 blocks on the GPU (ZeRO stages 1-3 without optimizer
    offload, and stage 0's ``FP16_Optimizer`` with FusedAdam in 16 bits); False at stage 0 otherwise (per-tensor
    states) and with optimizer offload (the step runs on the host)."""
    contiguous_block_bytes: int
    """B_c: one flat fp32 block of the step: the rank's fp32 partition 4p (stages 1-2), or one sub-group
    ``4 * min(p, sub_group_size)`` (stage 3)."""
    largest_free_block_bytes: int
    """B_L: the largest single block free in the cache when the first step begins: the fp32 logits backward
    frees (4 bytes per element of ``ActivationProfile.logits_bytes``), or, where the model sat whole on the GPU
    before ``deepspeed.initialize`` flattened or partitioned it (all but stage 3 under zero.Init), its largest
    parameter tensor (b n_max), whichever is larger."""
    offload_grad_bytes: int
    """G_o: the 16-bit gradients that leave through the host copy stream with optimizer offload, b P (P the
    trainable parameters) at stages 1-2, where every rank holds whole gradients until their bucket is reduced;
    b P / N_d at stage 3, where only the rank's reduce-scattered partition is copied (stage3.py
    ``partition_grads``: ``grad_buffer.to(device)`` of each partition, ``param.grad.record_stream``); else 0."""
    gathered_bytes: int
    """W: stage 3's gathered parameters at the forward/backward peak (``ModelStates.gathered_params_bytes``);
    0 at stages 0-2."""
    init_cached_bytes: int = 0
    """K: blocks the init frees that stay cached, each smaller than every later request of the init (module
    docstring); 0 where not modelled."""
    init_freed_block_bytes: int = 0
    """A flat block the init frees at its end, that the first step's first flat request of that size takes
    (stage_1_and_2.py ``initialize_optimizer_states``: the zero fp32 gradient of the partition, B_c, dropped by
    ``group.grad = None`` without optimizer offload); 0 elsewhere."""
    step_new_bytes: int = 0
    """Where set (> 0), the bytes of the first step that need a block of their own, in place of C (module
    docstring: stage 0's flat fp32 gradient, B_c)."""
    card_bytes: int = 0
    """M: the card's total memory where the setup names it (``TrainingSetup.gpu_memory_bytes``); 0: unknown, no
    cap."""
    comm_peers: int | None = None
    """NCCL peers of a real process group (N_d - 1), whose communicator sits outside the allocator beside the
    CUDA context; None on a fake process group."""
    logits_block_bytes: int = 0
    """B_log: one fp32 logits block of the loss, 4 bytes per element of ``ActivationProfile.logits_bytes``
    (module docstring, ``f_L``)."""
    frozen_resident_bytes: int = 0
    """F_r: the frozen weights resident from the load (``frozen_resident_bytes``), left out of ``f_p``'s base."""
    expandable_segments: bool = False
    """The allocator maps expandable segments (``TrainingSetup.expandable_segments``): ``R_x`` of the module
    docstring in place of the other terms."""
    sequence_reserved_bytes: int = 0
    """R_seq of the module docstring: the request sequence's replayed peak (``core.requests``, under the named card's
    limit); 0 where not built. With ``sequence_floor`` (a real NCCL group) only a floor under the other terms."""
    sequence_floor: bool = False
    sequence_retries: int = 0
    """Segments the replay tried again under the card's limit after giving the cache back (``num_alloc_retries``)."""
    sequence_out_of_memory: bool = False
    """The replay ran out of memory under the card's limit; R_seq is then what the run asks for without it."""

    def to_dict(self) -> dict:
        return asdict(self)


NO_BLOCKS = ReservedFacts(contiguous_step=False, contiguous_block_bytes=0, largest_free_block_bytes=0,
                          offload_grad_bytes=0, gathered_bytes=0)
"""Facts of a setup with no flat step buffers, offload or gathering: reserved is the largest phase peak with the
activation cache, the fraction and the constant."""


@dataclass(frozen=True, kw_only=True)
class ReservedTerms:
    """Predicted peak reserved by term (bytes, floats before rounding); ``total_bytes`` is their sum."""

    peak: float
    """The allocation the reserved memory is built on: the largest phase peak (steady) or the first step's base
    (first micro-step peak), whichever sets the reserved peak."""
    init_cache: float
    """K, where the init reserve is what the first step stacks on (else 0)."""
    activation_cache: float
    offload_grad_cache: float
    gathered_cache: float
    logits_cache: float
    """f_L B_log: the segment cut for an fp32 logits block, reserved beside what reuses it."""
    first_step_buffers: float
    """Flat step buffers that found no cached block large enough: max(0, C - r U)."""
    fraction_of_peak: float
    expandable_holes: float = 0.0
    """f_x (R - P): with expandable segments, the free blocks between live ones at the peak (module docstring,
    ``R_x``); 0 otherwise."""
    sequence_cache: float = 0.0
    """R_seq - P: what the request sequence's replay reserves beyond the largest phase peak (module docstring,
    ``R_seq``); 0 where the other terms set the reserve."""
    fixed: float
    rounding: float
    """Up to the next 2 MiB segment (``Overheads.reserved_block_bytes``)."""
    card_limit: float = 0.0
    """<= 0: down to the allocator's limit on the named card where the sum passes it (module docstring,
    ``R_card``); 0 without a card or below its limit."""
    set_by: str
    """Which candidate sets the peak: init, first step, or steady; with expandable segments ``expandable (...)``
    naming the default allocator's candidate that R came from."""

    @property
    def total_bytes(self) -> int:
        return round(sum(getattr(self, name) for name in RESERVED_TERMS))

    @property
    def unrounded_bytes(self) -> float:
        """The sum without ``rounding`` (continuous in the coefficients: what the fit works on)."""
        return sum(getattr(self, name) for name in RESERVED_TERMS if name != "rounding")

    def components(self) -> dict[str, int]:
        return {name: round(getattr(self, name)) for name in RESERVED_TERMS}


def reserved_facts(setup: TrainingSetup, states: ModelStates, act: ActivationProfile, trainable_numel: int,
                   dtype_bytes: int, *, frozen_numel: int, real_comm: bool = True) -> ReservedFacts:
    """``ReservedFacts`` of a setup (stage 3's sub-group from ``zero.sub_group_size``; b = ``dtype_bytes``; P =
    ``trainable_numel``, the parameters that get gradients; P_f = ``frozen_numel``, the others; ``real_comm``: a
    real NCCL process group)."""
    stage = int(setup.stage)
    offload = setup.zero.offload_optimizer != "none"
    from zeroest.estimator.core.architecture import param_tensors
    from zeroest.estimator.core.optimizers import flat_at_stage0

    block = states.master_weights_bytes
    if stage == 3:
        block = min(block, FP32 * setup.zero.sub_group_size)
    largest_param = dtype_bytes * max(t.numel for t in param_tensors(setup.model))
    free = FP32 * act.logits_bytes // dtype_bytes
    if not (stage == 3 and setup.zero.zero_init):
        free = max(free, largest_param)
    flat0 = stage == 0 and flat_at_stage0(setup) and block > 0
    cached = 3 * dtype_bytes * trainable_numel if flat0 else 0
    if stage in (1, 2) and setup.optimizer.param_groups == 1:
        cached = stage12_init_cache(trainable_numel, setup.world_size, dtype_bytes, largest_param, offload=offload)
    return ReservedFacts(
        contiguous_step=(stage >= 1 and not offload and block > 0) or flat0, contiguous_block_bytes=block,
        init_cached_bytes=cached, step_new_bytes=block if flat0 else 0,
        init_freed_block_bytes=block if stage in (1, 2) and not offload else 0,
        largest_free_block_bytes=free,
        offload_grad_bytes=dtype_bytes * trainable_numel // (setup.world_size if stage == 3 else 1) if offload else 0,
        gathered_bytes=states.gathered_params_bytes if stage == 3 else 0,
        card_bytes=setup.gpu_memory_bytes or 0, comm_peers=setup.world_size - 1 if real_comm else None,
        logits_block_bytes=FP32 * act.logits_bytes // dtype_bytes,
        frozen_resident_bytes=frozen_resident_bytes(setup, frozen_numel, dtype_bytes),
        expandable_segments=setup.expandable_segments)


def _total(components: dict[str, float]) -> float:
    return float(sum(components.values()))


def reserved_terms(phases: dict[str, dict[str, float]], facts: ReservedFacts, oh: Overheads) -> ReservedTerms:
    """The terms of the module docstring from the phases' components (``init``, ``forward``, ``backward``,
    ``step``: name -> component -> bytes, activations already scaled, the cuBLAS workspace in ``buffers``; a
    phase or component left out counts 0)."""
    empty: dict[str, float] = {}
    init, step = phases.get("init", empty), phases.get("step", empty)
    fwd, bwd = phases.get("forward", empty), phases.get("backward", empty)
    totals = {name: _total(c) for name, c in (("init", init), ("forward", fwd), ("backward", bwd), ("step", step))}
    if facts.sequence_reserved_bytes:
        built = _sequence_terms(totals, facts, oh)
        if not facts.sequence_floor:
            return built
        terms = reserved_terms(phases, replace(facts, sequence_reserved_bytes=0), oh)
        return terms if terms.total_bytes >= built.total_bytes else built
    if facts.expandable_segments:
        default = reserved_terms(phases, replace(facts, expandable_segments=False, card_bytes=0), oh)
        return _expandable_terms(totals, default, facts, oh)
    lazy = step.get("optimizer_states", 0.0) if init.get("optimizer_states", 0.0) == 0 else 0.0
    first_name = "forward" if totals["forward"] > totals["backward"] else "backward"
    peak_name = max(("forward", "backward", "step"), key=lambda n: totals[n])
    # backward's cached activation blocks are the forward's, freed into the cache as backward walks down: at a
    # backward peak with fewer activations live (a ZeRO-2 reduction deep in backward, core.reductions) they are
    # still reserved
    acts = {"forward": fwd.get("activations", 0.0),
            "backward": max(bwd.get("activations", 0.0), fwd.get("activations", 0.0)),
            "step": step.get("activations", 0.0)}
    r_init = totals["init"] + facts.init_cached_bytes
    caches = (oh.reserved_fraction_of_offload_grads * facts.offload_grad_bytes,
              oh.reserved_fraction_of_gathered * facts.gathered_bytes,
              oh.reserved_fraction_of_logits * facts.logits_block_bytes)
    act_first = oh.reserved_fraction_of_activations * acts[first_name]
    first_base = totals[first_name] - lazy
    r_first = max(r_init, first_base + act_first + sum(caches))
    new = 0.0
    if facts.contiguous_step:
        temporaries = step.get("temporaries", 0.0)
        new = facts.step_new_bytes or temporaries + lazy + max(0.0, step.get("grads", 0.0) - bwd.get("grads", 0.0))
        live_after_backward = totals["step"] - temporaries - lazy
        if facts.contiguous_block_bytes <= facts.largest_free_block_bytes:
            new = max(0.0, new - oh.reserved_reuse_fraction * max(0.0, r_first - live_after_backward))
    new_init = max(0.0, new - facts.init_freed_block_bytes)  # stacked on the init: its freed B_c is taken first
    act_peak = oh.reserved_fraction_of_activations * acts[peak_name]
    f_p, fixed = oh.reserved_fraction_of_peak, float(oh.reserved_fixed_bytes)
    steady = totals[peak_name] + act_peak + sum(caches)
    first = first_base + act_first + sum(caches) + new
    frozen = float(facts.frozen_resident_bytes)
    steady_fraction = f_p * max(0.0, steady - frozen)
    first_fraction = f_p * max(0.0, first - frozen)
    candidates = [  # (total, set_by, base, init cache, activation cache, caches, first-step buffers, fraction, fixed)
        (steady + steady_fraction + fixed, "steady", totals[peak_name], 0.0, act_peak, caches, 0.0, steady_fraction,
         fixed),
        (first + first_fraction + fixed, "first step", first_base, 0.0, act_first, caches, new, first_fraction,
         fixed),
        (r_init + (new_init if r_first == r_init else 0.0), "init", totals["init"], float(facts.init_cached_bytes), 0.0,
         (0.0, 0.0, 0.0), new_init if r_first == r_init else 0.0, 0.0, 0.0),
    ]
    total, set_by, base, init_cache, act, caches, new, fraction, fixed = max(candidates, key=lambda c: c[0])
    block = max(1, oh.reserved_block_bytes)
    rounded = round_up_bytes(total, block)
    return ReservedTerms(peak=base, init_cache=init_cache, activation_cache=act, offload_grad_cache=caches[0],
                         gathered_cache=caches[1], logits_cache=caches[2],
                         first_step_buffers=new, fraction_of_peak=fraction, fixed=fixed, rounding=rounded - total,
                         card_limit=_card_limit(rounded, max(totals.values()), facts, oh), set_by=set_by)


EXPANDABLE_PAGE_BYTES = 20 * 2**20
"""The page an expandable segment of the large pool maps at a time (c10/cuda/CUDACachingAllocator.cpp
``kLargeBuffer``, the ``segment_size_`` of ``ExpandableSegment``)."""


def _expandable_terms(totals: dict[str, float], default: ReservedTerms, facts: ReservedFacts,
                      oh: Overheads) -> ReservedTerms:
    """``R_x`` of the module docstring: the largest phase peak P and ``f_x`` of what the default allocator's terms
    (``default``, uncapped) keep beyond it, rounded up to the 20 MiB page, capped by the card as elsewhere."""
    peak = max(totals.values())
    holes = oh.reserved_fraction_expandable * max(0.0, default.unrounded_bytes - peak)
    total = peak + holes
    rounded = round_up_bytes(total, EXPANDABLE_PAGE_BYTES)
    return ReservedTerms(peak=peak, init_cache=0.0, activation_cache=0.0, offload_grad_cache=0.0, gathered_cache=0.0,
                         logits_cache=0.0, first_step_buffers=0.0, fraction_of_peak=0.0, expandable_holes=holes,
                         fixed=0.0, rounding=rounded - total, card_limit=_card_limit(rounded, peak, facts, oh),
                         set_by=f"expandable ({default.set_by})")


def _sequence_terms(totals: dict[str, float], facts: ReservedFacts, oh: Overheads) -> ReservedTerms:
    """``R_seq`` of the module docstring: the replayed sequence's peak reserve (at least the largest phase peak P),
    rounded up to the segment; on a named card the replay ran under its limit, which leaves no cap to apply."""
    peak = max(totals.values())
    total = max(float(facts.sequence_reserved_bytes), peak)
    block = max(1, oh.reserved_block_bytes)
    rounded = round_up_bytes(total, block)
    return ReservedTerms(peak=peak, init_cache=0.0, activation_cache=0.0, offload_grad_cache=0.0, gathered_cache=0.0,
                         logits_cache=0.0, first_step_buffers=0.0, fraction_of_peak=0.0, sequence_cache=total - peak,
                         fixed=0.0, rounding=rounded - total, set_by="request sequence")


def _card_limit(rounded: int, peak_allocated: float, facts: ReservedFacts, oh: Overheads) -> float:
    """``R_card - R`` of the module docstring (<= 0): floor(L / s) s - R where R passes it and the peak
    allocation P fits under it, L = M - C - N_c; else 0."""
    if not facts.card_bytes:
        return 0.0
    block = max(1, oh.reserved_block_bytes)
    limit = allocator_limit_bytes(facts.card_bytes, oh, peers=facts.comm_peers or 0,
                                  real_comm=facts.comm_peers is not None) // block * block
    return float(limit - rounded) if peak_allocated <= limit < rounded else 0.0


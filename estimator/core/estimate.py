"""``estimate(setup) -> Estimate``: the per-GPU memory of one rank, its peak phase, reserved and device memory.

Pure: no printing, no I/O beyond an optional activation-profile cache, no torch unless a traced profile is asked for.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields, replace

from zeroest.estimator.core.activations import activation_profile, tracer_available
from zeroest.estimator.core.architecture import count_params
from zeroest.estimator.core.capacity import flatten_decision, flatten_note
from zeroest.estimator.core.host import HostTerms, host_note, host_terms
from zeroest.estimator.core.model_states import Device, ModelStates, stage0_states, stage12_states, trained
from zeroest.estimator.core.optimizers import optimizer_notes
from zeroest.estimator.core.overheads import Overheads, allocator_limit_bytes, device_from
from zeroest.estimator.core.qlora import qlora_note, with_4bit_base
from zeroest.estimator.core.requests import sequence_gap
from zeroest.estimator.core.reserved import (
    ReservedFacts,
    ReservedTerms,
    reserved_facts,
    reserved_terms,
)
from zeroest.estimator.core.setup import DTYPE_BYTES, MAX_PARAMS, TrainingSetup, ZeroStage
from zeroest.estimator.core.stage3 import stage3_states
from zeroest.estimator.core.timeline import COMPONENTS, Phase, peak_phase, timeline
from zeroest.estimator.core.vocab import LOOP_RULE, PARAM_GROUPS_RULE, ZERO_INIT_RULE, Loop
from zeroest.estimator.units import GiB

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Estimate:
    """Predicted memory of one rank. ``components`` describe what is held at the peak and sum to it."""

    setup: TrainingSetup
    n_params: int
    """Exact parameter count of the model."""
    components: dict[str, int]
    """Bytes by component at the peak phase; they sum to ``peak_allocated_bytes``."""
    peak_allocated_bytes: int
    """Predicted ``torch.cuda.max_memory_allocated()`` over the run (paper mode: the paper's model states)."""
    peak_phase: str
    """The phase that sets the peak: init, forward, backward or step."""
    phases: tuple[Phase, ...]
    """Every phase's peak and components."""
    peak_reserved_bytes: int
    """Predicted ``torch.cuda.max_memory_reserved()``."""
    device_bytes: int
    """What nvidia-smi shows for the process: reserved + CUDA context + NCCL buffers."""
    cpu_bytes_per_node: int
    """Host RAM per node: ``host.per_node_bytes`` (the process, each rank's load-time model copy, its offloaded
    states and pinned buffers, times the ranks per node)."""
    nvme_bytes: int
    """Bytes per rank on NVMe (ZeRO-Infinity)."""
    activation_source: str
    """traced, closed-form, or none (paper mode)."""
    overheads: Overheads
    host: HostTerms | None = None
    """Host RAM of one rank by term (``core.host``); None in paper mode."""
    reserved: ReservedTerms | None = None
    """Peak reserved by caching-allocator term (``core.reserved``); None in paper mode."""
    reserved_facts: ReservedFacts | None = None
    """Block sizes the reserved terms use (``core.reserved``); None in paper mode."""
    assumptions: tuple[str, ...] = field(default=())

    @property
    def stage(self) -> int:
        return int(self.setup.stage)

    @property
    def world_size(self) -> int:
        return self.setup.world_size

    def to_dict(self) -> dict:
        """predict's JSON object: other tools read it, keep it stable."""
        from zeroest.estimator.configs.flat import setup_to_dict

        return {
            "stage": self.stage,
            "world_size": self.world_size,
            "n_params": self.n_params,
            "components": dict(self.components),
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "peak_reserved_bytes": self.peak_reserved_bytes,
            "device_bytes": self.device_bytes,
            "peak_phase": self.peak_phase,
            "phases": {p.name: {"peak_bytes": p.peak_bytes, "components": dict(p.components),
                                **({"candidates": [dict(c) for c in p.candidates]} if p.candidates else {})}
                       for p in self.phases},
            "cpu_bytes_per_node": self.cpu_bytes_per_node,
            "host_components": self.host.components() if self.host else {},
            "reserved_components": self.reserved.components() if self.reserved else {},
            "reserved_set_by": self.reserved.set_by if self.reserved else None,
            "reserved_facts": self.reserved_facts.to_dict() if self.reserved_facts else {},
            "nvme_bytes": self.nvme_bytes,
            "activation_source": self.activation_source,
            "overheads_source": self.overheads.source,
            "setup": setup_to_dict(self.setup),
            "assumptions": list(self.assumptions),
        }


def model_states(setup: TrainingSetup, device: Device = "cuda", *, flatten_on_gpu: bool = True) -> ModelStates:
    """DeepSpeed-faithful model states of one rank for the setup's stage (``device`` picks torch's optimizer path;
    ``flatten_on_gpu`` is stage 1-2's capacity branch, ``core.capacity``). Frozen parameters (LoRA, ``--freeze``)
    hold only their 16-bit weights; the optimizer side covers the trainable ones (``core.adapters.trainable_split``).
    """
    split = trained(setup)
    if setup.stage == ZeroStage.DISABLED:
        return with_4bit_base(setup, stage0_states(setup, split, device))
    if setup.stage <= ZeroStage.GRADIENTS:
        return with_4bit_base(setup, stage12_states(setup, split, device, flatten_on_gpu=flatten_on_gpu))
    return stage3_states(setup, device)


def reserved_bytes(phases: tuple[Phase, ...], facts: ReservedFacts, overheads: Overheads) -> ReservedTerms:
    """Predicted peak reserved by term (``core.reserved.reserved_terms`` over the phases)."""
    return reserved_terms({p.name: p.components for p in phases}, facts, overheads)


def _scaled(act, factor: float):
    """The profile with every byte count multiplied by a fitted ``activation_scale``."""
    return replace(act, **{f.name: round(getattr(act, f.name) * factor) for f in fields(act)
                          if isinstance(getattr(act, f.name), int) and not isinstance(getattr(act, f.name), bool)})


LOOP_NOTES = {
    Loop.TRAINER: "only the loss survives the forward (HF Trainer's compute_loss)",
    Loop.CUSTOM: "the output object and its logits live until the next forward returns (outputs reassigned "
                 "each micro-step)",
    Loop.CUSTOM_DEL: "the output object and its logits live through backward and step, then del outputs",
}


def _adapters_fp32(setup: TrainingSetup) -> bool:
    """peft 0.21 upcasts 16-bit LoRA adapters to fp32 (peft_model.py ``_cast_adapter_dtype``); DeepSpeed 0.19.8
    casts them back to the run's dtype (engine.py ``_cast_module_mixed_precision``) except for a model built
    under zero.Init, whose new parameters stage 3 converts without a cast (partition_parameters.py
    ``_convert_to_zero_parameters``)."""
    return setup.adapters.lora and setup.zero.builds_partitioned and setup.dtype != "fp32"


def _adapters_note(setup: TrainingSetup) -> str:
    a = setup.adapters
    if a.lora:
        dtype = "fp32 (peft's upcast, kept under zero.Init)" if _adapters_fp32(setup) else setup.dtype
        ckpt = ", checkpointing switched on before peft wraps the model" if setup.workload.grad_ckpt else ""
        return (f"activations of LoRA r={a.lora_rank} on {a.lora_targets}, dropout {a.lora_dropout}: base "
                f"weights frozen, adapters in {dtype}{ckpt}{_zero3_linear_note(setup)}")
    return ("activations with frozen weights: traced as frozen (the closed form keeps the full fine-tune's, an "
            f"upper bound){_zero3_linear_note(setup)}")


def _zero3_linear_note(setup: TrainingSetup) -> str:
    """Stage 3 replaces torch.nn.functional.linear (zero_optimization.memory_efficient_linear, on by default)."""
    if setup.stage != ZeroStage.PARAMETERS:
        return ""
    return ("; ZeRO-3's linear keeps every frozen Linear's input (DeepSpeed's default memory_efficient_linear; "
            "false would save less)")


def _loop_note(setup: TrainingSetup) -> str:
    loop = setup.workload.loop
    return f"training loop {loop}: {LOOP_NOTES[loop]} ({LOOP_RULE}; --loop changes it)"


def _assumptions(setup: TrainingSetup, source: str) -> tuple[str, ...]:
    m = setup.model
    notes = [
        f"model {m.name}: {m.family}, {m.num_layers} layers, hidden {m.hidden_size}, {m.num_heads} heads "
        f"({m.num_kv_heads} kv), MLP {m.intermediate_size}{' gated' if m.gated_mlp else ''}, vocab {m.vocab_size}",
        f"{setup.dtype} training, {setup.optimizer.name} ({setup.optimizer.impl}), N_d = {setup.world_size}",
        f"micro-batch {setup.workload.micro_batch} x {setup.workload.seq_len} tokens, {setup.workload.attn} attention,"
        f" gradient checkpointing {'on' if setup.workload.grad_ckpt else 'off'},"
        f" accumulation {setup.workload.grad_accum}",
        f"activations: {source}",
        _loop_note(setup),
    ]
    if m.extra.get("sparse_layers"):  # core.closed_form_moe
        notes.insert(1, f"{m.extra['num_experts']} experts of width {m.extra['expert_size']}, top "
                        f"{m.extra['top_k']}, in {len(m.extra['sparse_layers'])} of {m.num_layers} layers, run as "
                        "transformers' default grouped_mm (every token's k rows, whatever the routing)")
    if setup.stage in (ZeroStage.OPTIMIZER_STATES, ZeroStage.GRADIENTS) and setup.zero.offload_optimizer == "none":
        notes.append(f"{setup.optimizer.param_groups} optimizer parameter group(s): with more than one the 16-bit "
                     f"gradients live through the step ({PARAM_GROUPS_RULE}; --param-groups changes it)")
    if setup.stage == ZeroStage.PARAMETERS:
        notes.append("model built under zero.Init (never whole on one GPU)" if setup.zero.zero_init else
                     f"model built whole on the host, then partitioned (no zero.Init; {ZERO_INIT_RULE}; "
                     "--zero-init changes it)")
    notes += optimizer_notes(setup) + qlora_note(setup)
    if not setup.adapters.full:
        notes.append(_frozen_note(setup))
        notes.append(_adapters_note(setup))
    if setup.mode == "paper":
        notes.append("paper mode: ZeRO paper model states (2 + 2 + K) Psi with K = 12; no activations or buffers")
    else:
        notes.append("caching allocator: expandable segments (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True)"
                     if setup.expandable_segments else
                     "caching allocator: torch's default segments (the larger reserve; --expandable-segments if "
                     "the job sets PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True)")
    return tuple(notes)


def _frozen_note(setup: TrainingSetup) -> str:
    """What the model states hold with LoRA or frozen weights."""
    split = trained(setup)
    total, trainable = split.total_numel, split.trainable_numel
    where = ("partitioned over the ranks like the trainable ones (ZeRO-3)" if setup.stage == ZeroStage.PARAMETERS
             else "whole on every rank as the model's own tensors")
    return (f"LoRA/frozen weights: {trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%); "
            f"the frozen ones hold only their {setup.dtype} weights, {where}; master weights, optimizer states and "
            "gradients cover the trainable ones (DeepSpeed's is_optimized_parameter)")


def _sequence_replay(setup: TrainingSetup, flatten, limit_bytes: int):
    """R_seq (``core.reserved``): the setup's request sequence replayed (``trace.requests``, torch imported there)
    under the card's limit (0: none), or None where ``core.requests.sequence_gap`` does not cover the setup or the
    trace fails (then the fitted terms give the reserve, with a warning)."""
    if sequence_gap(setup):
        return None
    from zeroest.estimator.trace.requests import sequence_replay

    try:
        return sequence_replay(setup, flatten_on_cpu=flatten is not None and not flatten.on_gpu,
                               limit_bytes=limit_bytes)
    except Exception as err:  # noqa: BLE001 (any failure of a third-party model falls back, with a warning)
        log.warning(f"could not build the request sequence of {setup.model.name} ({type(err).__name__}: "
                    f"{str(err).splitlines()[0] if str(err) else ''}); reserved memory from the fitted terms")
        return None


def _card_limit_note(terms: ReservedTerms) -> str | None:
    """The assumption line where the card caps the reserve (``card_limit`` < 0), else None."""
    if terms.card_limit >= 0:
        return None
    return (f"the caching allocator would reserve {(terms.total_bytes - terms.card_limit) / GiB:.2f} GiB, more "
            f"than the card leaves it: it frees its cache and retries at {terms.total_bytes / GiB:.2f} GiB "
            "(num_alloc_retries; slower steps), so that is the reserved peak given")


def _sequence_note(setup: TrainingSetup, facts: ReservedFacts, terms: ReservedTerms) -> str:
    """Where reserved memory came from, for setups the request sequence covers or could."""
    if not facts.sequence_reserved_bytes:
        why = sequence_gap(setup)
        return (f"reserved memory from the fitted allocator terms: the request sequence does not cover this setup "
                f"({why})" if why else "")
    built = f"{facts.sequence_reserved_bytes / GiB:.2f} GiB"
    if facts.sequence_out_of_memory:
        built += (", what the run asks for: under the card's limit a request finds no room even after the allocator "
                  "gives its cache back, so the run is predicted to run out of memory")
    elif facts.sequence_retries:
        built += (f" under the card's limit, after the allocator gives its cache back {facts.sequence_retries} "
                  "time(s) (num_alloc_retries; slower steps)")
    if facts.expandable_segments:
        built += ", expandable segments"
    if not facts.sequence_floor:
        builder = {0: "core.zero0_requests", 3: "core.zero3_requests"}.get(int(setup.stage), "core.requests")
        return (f"reserved memory: the run's allocator requests replayed through torch's caching allocator ({built}; "
                f"{builder})")
    picked = "it" if terms.set_by == "request sequence" else "the fitted terms"
    return (f"reserved memory: the larger of the run's allocator requests replayed through torch's caching allocator "
            f"({built}) and the fitted terms, here {picked}: the sequence was checked on one rank of simulated jobs "
            "and on single-GPU runs, and a real NCCL group's streams can hold blocks longer")


def _paper_estimate(setup: TrainingSetup, numel: int, overheads: Overheads) -> Estimate:
    from zeroest.estimator.core.paper import paper_states

    numel = setup.model.nominal_params or numel
    states = paper_states(numel, setup.world_size, int(setup.stage))
    comps = {name: 0 for name in COMPONENTS}
    comps.update(params=round(states.params_bytes), grads=round(states.grads_bytes),
                 optimizer_states=round(states.optimizer_states_bytes))
    phase = Phase(name="step", components=comps)
    total = phase.peak_bytes
    return Estimate(
        setup=setup, n_params=numel, components=comps, peak_allocated_bytes=total, peak_phase="step",
        phases=(phase,), peak_reserved_bytes=total, device_bytes=total, cpu_bytes_per_node=0, nvme_bytes=0,
        activation_source="none", overheads=overheads, assumptions=_assumptions(setup, "none (paper mode)"),
    )


def estimate(setup: TrainingSetup, overheads: Overheads | None = None, *, device: Device = "cuda",
             simulated: bool = False, sequence: bool = True) -> Estimate:
    """Predict one rank's memory for ``setup`` (see ``Estimate``) on the rank that holds most.

    ``device="cpu"`` predicts a CPU run (tests, ``validate --cpu``): torch's optimizers then take their single-tensor
    path, whose temporaries differ, and there is no cuBLAS workspace, CUDA context or allocator rounding.
    ``simulated=True`` predicts rank 0 of the job on a fake process group (``validate --simulate-world-size``):
    the same allocations, and no NCCL communicator memory. ``sequence=False`` leaves the request sequence out
    (``core.requests``): the reserve comes from the fitted terms alone, as ``plan``'s searches take it.
    """
    overheads = overheads or Overheads()
    numel = count_params(setup.model).total
    if setup.mode == "paper":
        return _paper_estimate(setup, numel, overheads)
    if device == "cpu":
        overheads = replace(overheads, cublas_workspace_bytes=0, cuda_context_bytes=0, nccl_bytes_per_peer=0,
                            nccl_communicator_bytes=0, reserved_block_bytes=1, reserved_fraction_of_peak=0.0,
                            reserved_fraction_of_activations=0.0, reserved_reuse_fraction=0.0,
                            reserved_fraction_of_offload_grads=0.0, reserved_fraction_of_gathered=0.0,
                            reserved_fraction_of_logits=0.0, reserved_fraction_expandable=0.0,
                            reserved_fixed_bytes=0)
    # on the CPU, available_memory() is the host's free RAM: the on-device branch (cpu_accelerator.py)
    split = trained(setup)  # the model as trained: LoRA adapters added, frozen weights marked
    if split.total_numel > MAX_PARAMS:
        raise ValueError(f"{setup.model.name} holds {split.total_numel:.3g} parameters as trained "
                         f"({split.trainable_numel:.3g} trainable), beyond the {MAX_PARAMS:.0e} zeroest estimates: "
                         "check the model's config (hidden_size, layers) or --lora-rank")
    flatten = (flatten_decision(setup, split.total_numel, overheads, real_comm=not simulated,
                                trainable_numel=split.trainable_numel) if device == "cuda" else None)
    states = model_states(setup, device, flatten_on_gpu=flatten is None or flatten.on_gpu)
    w = setup.workload
    act, source = activation_profile(setup.model, w.micro_batch, w.seq_len, setup.dtype, w.attn, mode=w.activations,
                                     target=device, adapters=setup.adapters, adapters_fp32=_adapters_fp32(setup),
                                     zero3_linear=setup.stage == ZeroStage.PARAMETERS)
    phases = timeline(setup, states,
                      act if overheads.activation_scale == 1 else _scaled(act, overheads.activation_scale))
    def with_workspace(c: dict[str, int]) -> dict[str, int]:
        return {**c, "buffers": c["buffers"] + overheads.cublas_workspace_bytes}

    phases = tuple(
        p if p.name == "init" else Phase(name=p.name, components=with_workspace(p.components),
                                         candidates=tuple(with_workspace(c) for c in p.candidates))
        for p in phases
    )
    peak = peak_phase(phases)
    facts = reserved_facts(setup, states, act, split.trainable_numel, DTYPE_BYTES[setup.dtype],
                           frozen_numel=split.frozen_numel, real_comm=not simulated)
    if device == "cpu":  # no caching allocator: reserved is the peak allocation
        facts = replace(facts, contiguous_step=False)
    elif sequence and w.activations != "closed-form" and tracer_available(setup.adapters):
        limit = setup.gpu_memory_bytes and allocator_limit_bytes(
            setup.gpu_memory_bytes, overheads, peers=setup.world_size - 1, real_comm=not simulated)
        built = _sequence_replay(setup, flatten, max(0, limit or 0))
        if built is not None:
            facts = replace(facts, sequence_reserved_bytes=built.peak_reserved_bytes,
                            sequence_floor=not simulated and setup.world_size > 1, sequence_retries=built.retries,
                            sequence_out_of_memory=built.out_of_memory)
    terms = reserved_bytes(phases, facts, overheads)
    reserved = terms.total_bytes
    device = math.ceil(device_from(reserved, overheads, peers=setup.world_size - 1, real_comm=not simulated))
    # the load copy on the host: the whole model as trained, frozen weights and adapters
    host = host_terms(setup, split.total_numel, states, overheads, real_comm=not simulated)
    return Estimate(
        setup=setup,
        n_params=numel,
        components=dict(peak.components),
        peak_allocated_bytes=peak.peak_bytes,
        peak_phase=peak.name,
        phases=phases,
        peak_reserved_bytes=reserved,
        device_bytes=device,
        cpu_bytes_per_node=host.per_node_bytes,
        nvme_bytes=states.nvme_bytes,
        activation_source=source,
        overheads=overheads,
        host=host,
        reserved=terms,
        reserved_facts=facts,
        assumptions=_assumptions(setup, source) + tuple(n for n in (flatten_note(flatten), host_note(host),
                                                                 _sequence_note(setup, facts, terms),
                                                                 _card_limit_note(terms)) if n),
    )

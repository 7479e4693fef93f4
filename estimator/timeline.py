"""The per-phase timeline of one DeepSpeed training step, and the peak over a whole run.

A training run goes through ``deepspeed.initialize`` (init), then per micro-step a forward and a backward, and every
``grad_accum`` micro-steps an ``engine.step()``. Each phase holds some buffers for its whole length (model states) and
some only at its own peak (activations, temporaries). The peak allocated memory of the run is the largest phase peak;
the first step, which creates the optimizer states, is covered because steady-state phases already hold them.

Within backward, activations are freed layer by layer while gradients appear layer by layer; both change linearly in
the number of layers done, so the backward peak lies at its start or its end and only those two points are evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass

from .activations import ActivationProfile
from .architecture import param_tensors
from .model_states import ModelStates
from .setup import DTYPE_BYTES, TrainingSetup, ZeroStage

PHASES: tuple[str, ...] = ("init", "forward", "backward", "step")
COMPONENTS: tuple[str, ...] = (
    "params", "master_weights", "optimizer_states", "grads", "buffers", "activations", "temporaries",
)


@dataclass(frozen=True, kw_only=True)
class Phase:
    """What one rank holds at the peak of a phase, by component (bytes)."""

    name: str
    components: dict[str, int]

    @property
    def peak_bytes(self) -> int:
        return sum(self.components.values())


def _components(**parts: int) -> dict[str, int]:
    return {name: int(parts.get(name, 0)) for name in COMPONENTS}


def _head_param_numel(setup: TrainingSetup) -> int:
    """Parameters whose gradients exist before the first decoder layer's backward: lm_head and the final norm."""
    tensors = param_tensors(setup.model)
    layer_marks = (".layers.", ".h.", ".layer.")
    return sum(
        t.numel for t in tensors
        if t.component in ("lm_head", "norms") and not any(mark in t.name for mark in layer_marks)
    )


def _grads_held(setup: TrainingSetup, states: ModelStates, head_numel: int, at_end: bool) -> int:
    """Gradient bytes alive at the start (after the head) or at the end of backward.

    Stages 0-1 keep the model's own ``param.grad`` (engine.py / stage_1_and_2.py): they grow from the head's to all
    of them. Stage 2 copies each reduced gradient into ``grads_in_partition`` (allocated whole at the first copy).
    Stage 3 holds ``grad_partitions_flat_buffer`` from init (counted as a held buffer, not here).
    With gradient accumulation, micro-steps after the first start with the previous gradients held.
    """
    b = DTYPE_BYTES[setup.dtype]
    if setup.stage >= ZeroStage.PARAMETERS:
        return 0
    if setup.stage == ZeroStage.GRADIENTS:
        return states.grads_bytes if (at_end or setup.workload.grad_accum > 1) else 0
    if at_end or setup.workload.grad_accum > 1:
        return states.grads_bytes
    return b * head_numel


def timeline(setup: TrainingSetup, states: ModelStates, act: ActivationProfile) -> tuple[Phase, ...]:
    """The four phases of a steady training step (plus init), each with its peak's components."""
    stage3 = setup.stage >= ZeroStage.PARAMETERS
    ckpt = setup.workload.grad_ckpt
    held = dict(
        params=states.params_bytes,
        master_weights=states.master_weights_bytes,
        optimizer_states=states.optimizer_states_bytes,
    )
    stage3_buffers = states.grads_bytes + states.buckets_bytes if stage3 else 0
    head_numel = _head_param_numel(setup)
    carry = _grads_held(setup, states, head_numel, at_end=False) if setup.workload.grad_accum > 1 else 0

    init = Phase(name="init", components=_components(
        params=states.params_bytes,
        master_weights=states.master_weights_bytes,
        buffers=stage3_buffers,
        temporaries=states.init_extra_bytes,
    ))
    forward = Phase(name="forward", components=_components(
        **held,
        grads=carry,
        buffers=stage3_buffers + states.gathered_params_bytes,
        activations=act.forward_peak_bytes(ckpt),
    ))
    bucket = 0 if stage3 else states.buckets_bytes
    start = _components(
        **held,
        grads=_grads_held(setup, states, head_numel, at_end=False),
        buffers=stage3_buffers + states.gathered_params_bytes + bucket,
        activations=act.backward_peak_bytes(ckpt),
    )
    end = _components(
        **held,
        grads=_grads_held(setup, states, head_numel, at_end=True),
        buffers=stage3_buffers + states.gathered_params_bytes + bucket,
        activations=act.backward_live_after_layers(setup.model.num_layers, ckpt),
    )
    backward = Phase(name="backward", components=max(start, end, key=lambda c: sum(c.values())))
    step = Phase(name="step", components=_components(
        **held,
        grads=states.grads_bytes if setup.stage == ZeroStage.DISABLED or stage3 else 0,
        buffers=states.buckets_bytes if stage3 else 0,
        temporaries=states.step_temp_bytes + states.optimizer_temp_bytes,
    ))
    return (init, forward, backward, step)


def peak_phase(phases: tuple[Phase, ...]) -> Phase:
    """The phase with the largest peak (the first of equals, in run order)."""
    return max(phases, key=lambda p: p.peak_bytes)

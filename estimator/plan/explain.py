"""A plain-language account of an estimate: where the memory goes and which knob frees the most.

Every saving is measured, not guessed: the estimate is run again with one knob turned (gradient checkpointing
on, half the micro-batch with twice the accumulation, a higher ZeRO stage, optimizer or parameter offload,
twice the GPUs, sdpa instead of eager attention, a loop that keeps only the loss) and the device memory
compared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from zeroest.estimator.core.estimate import Estimate, estimate
from zeroest.estimator.core.setup import TrainingSetup, ZeroStage
from zeroest.estimator.core.vocab import CPU_OPTIMIZERS, Loop
from zeroest.estimator.units import format_gib

LABELS = {
    "params": "parameters",
    "master_weights": "fp32 master weights",
    "optimizer_states": "optimizer states",
    "grads": "gradients",
    "buffers": "buffers",
    "activations": "activations",
    "temporaries": "temporaries",
}
INIT_LABELS = {
    "temporaries": "temporaries of deepspeed.initialize (the loaded 16-bit model while it is flattened or "
    "partitioned: model_states.py init_extra_bytes)",
}
"""What a component is when the peak is at init."""
LOOP_FIX = ("keep only the loss before backward (loss = model(**batch).loss, or del outputs before "
            "backward), or train with the HF Trainer")
"""The change that makes a custom loop's memory the Trainer's (``--loop trainer``)."""
SHARE_SHOWN = 0.05
"""Components below this fraction of the peak are not mentioned."""


@dataclass(frozen=True, kw_only=True)
class Knob:
    """One change to a setup and what it does to the device memory."""

    name: str
    """What was changed, in words."""
    setup: TrainingSetup
    """The changed setup."""
    device_bytes: int
    """Predicted device memory with the change."""
    saved_bytes: int
    """Device memory freed (negative: the change costs memory)."""


def _workload(setup: TrainingSetup, **changes) -> TrainingSetup:
    return replace(setup, workload=replace(setup.workload, **changes))


def _offload(setup: TrainingSetup, params: bool) -> TrainingSetup:
    zero = replace(setup.zero, offload_optimizer="cpu", offload_params="cpu" if params else "none")
    return replace(setup, zero=zero, optimizer=replace(setup.optimizer, impl="cpu"))


def knob_changes(setup: TrainingSetup) -> list[tuple[str, TrainingSetup]]:
    """The single-knob changes that apply to ``setup``, named."""
    w, zero, world = setup.workload, setup.zero, setup.world_size
    changes = []
    if not w.grad_ckpt:
        changes.append(("gradient checkpointing", _workload(setup, grad_ckpt=True)))
    if w.micro_batch > 1:
        half = w.micro_batch // 2
        changes.append(
            (
                f"micro-batch {half} with accumulation {w.grad_accum * 2}",
                _workload(setup, micro_batch=half, grad_accum=w.grad_accum * 2),
            )
        )
    if world > 1:
        for stage in range(int(setup.stage) + 1, 4):
            changes.append((f"ZeRO-{stage}", setup.with_stage(stage)))
    adam = setup.optimizer.name in CPU_OPTIMIZERS  # DeepSpeedCPUAdam or DeepSpeedCPULion runs it offloaded
    if adam and setup.stage >= ZeroStage.OPTIMIZER_STATES and zero.offload_optimizer == "none":
        changes.append(("optimizer offload to cpu", _offload(setup, params=False)))
    if adam and setup.stage == ZeroStage.PARAMETERS and zero.offload_params == "none":
        changes.append(("optimizer and parameter offload to cpu", _offload(setup, params=True)))
    if setup.stage >= ZeroStage.OPTIMIZER_STATES:
        doubled = replace(setup.parallel, nodes=setup.parallel.nodes * 2)
        changes.append((f"twice the GPUs (N_d = {2 * world})", replace(setup, parallel=doubled)))
    if w.attn == "eager" and setup.model.family != "gemma2":  # gemma2 has no sdpa (core.closed_form_gemma)
        changes.append(("sdpa attention", _workload(setup, attn="sdpa")))
    if w.loop != Loop.TRAINER:
        changes.append((LOOP_FIX, _workload(setup, loop=Loop.TRAINER)))
    return changes


def loop_line(est: Estimate, found: list[Knob]) -> str | None:
    """The sentence naming the loop when the output object it keeps (its b x s x V logits) raises the peak."""
    fix = next((k for k in found if k.setup.workload.loop == Loop.TRAINER and k.name == LOOP_FIX), None)
    if fix is None or fix.saved_bytes <= 0:
        return None
    m, w = est.setup.model, est.setup.workload
    return (f"the {w.loop} loop keeps the output object alive ({w.micro_batch} x {w.seq_len} x {m.vocab_size} "
            f"logits in {est.setup.dtype}) beyond the forward; it costs {format_gib(fix.saved_bytes, 2)}: "
            f"{LOOP_FIX} (--loop trainer)")


def knobs(est: Estimate, estimator: Callable[[TrainingSetup], Estimate] | None = None) -> list[Knob]:
    """Each applicable knob re-estimated, largest saving first."""
    run = estimator or (lambda s: estimate(s, est.overheads))
    out = []
    for name, setup in knob_changes(est.setup):
        after = run(setup).device_bytes
        out.append(Knob(name=name, setup=setup, device_bytes=after, saved_bytes=est.device_bytes - after))
    return sorted(out, key=lambda k: -k.saved_bytes)


def explain(
    est: Estimate, *, estimator: Callable[[TrainingSetup], Estimate] | None = None, top: int = 4
) -> list[str]:
    """Short sentences: the peak, the largest components' shares, and the ``top`` knobs that free the most."""
    peak = est.peak_allocated_bytes
    lines = [
        f"the peak is {format_gib(peak, 1)} allocated, set in the {est.peak_phase} phase; "
        f"{format_gib(est.device_bytes, 1)} on the device with the CUDA context and allocator cache"
    ]
    labels = {**LABELS, **(INIT_LABELS if est.peak_phase == "init" else {})}
    if peak:
        for name, size in sorted(est.components.items(), key=lambda kv: -kv[1]):
            if size / peak >= SHARE_SHOWN:
                lines.append(
                    f"{labels.get(name, name)} are {100 * size / peak:.0f}% of the peak "
                    f"({format_gib(size, 1)})"
                )
    if est.setup.mode == "paper":
        return lines
    if est.world_size == 1 and est.stage < ZeroStage.PARAMETERS:
        lines.append(
            f"ZeRO-{est.stage + 1}..3 cannot help here: N_d = 1, so there is nothing to partition over"
        )
    found = knobs(est, estimator)
    named = loop_line(est, found)
    lines += [named] if named else []
    helpful = [k for k in found if k.saved_bytes > 0]
    for knob in helpful[:top]:
        lines.append(
            f"{knob.name} saves {format_gib(knob.saved_bytes, 1)} (device "
            f"{format_gib(est.device_bytes, 1)} -> {format_gib(knob.device_bytes, 1)})"
        )
    lines.append("for every combination of these knobs with the micro-batch, fastest first: zeroest plan --gpu CARD")
    if helpful:
        lines.append(f"the knob that frees the most: {helpful[0].name}")
    else:
        lines.append("no single knob frees memory here")
    return lines

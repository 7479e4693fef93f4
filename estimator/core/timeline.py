"""The per-phase timeline of one DeepSpeed training step, and the peak over a whole run.

A training run goes through ``deepspeed.initialize`` (init), then per micro-step a forward and a backward, and every
``grad_accum`` micro-steps an ``engine.step()``. Each phase holds some buffers for its whole length (model states) and
some only at its own peak (activations, temporaries). The peak allocated memory of the run is the largest phase peak;
the first step, which creates the optimizer states, is covered because steady-state phases already hold them.

The training loop decides how long the model's output object lives (``loop_outputs_bytes``): its logits sit in
every phase after the forward that made them unless the loop keeps only the loss.

Within backward, activations are freed layer by layer while gradients appear layer by layer; both change linearly in
the number of layers done, so the backward peak lies at its start or its end and only those two points are evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass

from zeroest.estimator.core.flat_group import stage2_grads_at_head_numel, stage2_grads_before_embedding_numel
from zeroest.estimator.core.model_states import ModelStates, trained
from zeroest.estimator.core.profile import ActivationProfile
from zeroest.estimator.core.reductions import backward_reductions
from zeroest.estimator.core.setup import DTYPE_BYTES, TrainingSetup, ZeroStage
from zeroest.estimator.core.vocab import Loop

PHASES: tuple[str, ...] = ("init", "forward", "backward", "step")
COMPONENTS: tuple[str, ...] = (
    "params", "master_weights", "optimizer_states", "grads", "buffers", "activations", "temporaries",
)


@dataclass(frozen=True, kw_only=True)
class Phase:
    """What one rank holds at the peak of a phase, by component (bytes)."""

    name: str
    components: dict[str, int]
    candidates: tuple[dict[str, int], ...] = ()
    """Every candidate peak point of the phase, the chosen one included (backward's: the loss's backward, the
    lm_head's, a layer's, the end); empty where the phase has one point. ``zeroest report --fit`` needs them all:
    which one wins depends on the activation scale it fits."""

    @property
    def peak_bytes(self) -> int:
        return sum(self.components.values())


def _components(**parts: int) -> dict[str, int]:
    return {name: int(parts.get(name, 0)) for name in COMPONENTS}


def _head_param_numel(setup: TrainingSetup) -> int:
    """Trainable parameters whose gradients exist before the first decoder layer's backward: lm_head and the final
    norm (a frozen one gets no ``param.grad``; a ``modules_to_save`` copy of lm_head does)."""
    layer_marks = (".layers.", ".h.", ".layer.")
    return sum(
        t.numel for t in trained(setup).trainable
        if t.component in ("lm_head", "norms") and not any(mark in t.name for mark in layer_marks)
    )


def lm_head_grad_bytes(setup: TrainingSetup, act: ActivationProfile) -> tuple[int, int]:
    """(activation bytes above the saved stack, weight-gradient bytes) when the lm_head's matmul runs backward.

    autograd runs the loss's nodes first: ``log_softmax_backward`` consumes the fp32 log-softmax output that
    cross-entropy saved (4 b s V, released once its node has run) and the cast back to the model's dtype leaves
    the logits' gradient (``grad_logits_bytes``); then ``lm_head``'s ``MmBackward`` makes the hidden state's
    gradient and the weight's, b V h in the model's dtype, whole, until the parameter's gradient hook takes it:
    stage 3 (stage3.py ``reduce_partition_and_remove_grads``) and stage 2 (stage_1_and_2.py
    ``reduce_independent_p_g_buckets_and_remove_grads``) copy it into the reduce bucket and drop it. A tied lm_head
    is the token embedding's weight. Measured (data/runs/h200-zeroinit, stage 3, 1 x 512): llama-3-8b backward
    peaks 0.860 GiB above the end of forward, qwen2.5-7b 0.874; this moment gives 0.86 and 0.87 (the loss's own
    backward 0.49 and 0.57).
    """
    tensors = trained(setup).trainable  # a frozen lm_head (LoRA) makes no weight gradient
    head = next((t for t in tensors if t.component == "lm_head"), None)
    if head is None and setup.model.tied_embeddings:
        head = next((t for t in tensors if t.component == "embeddings"), None)
    log_softmax = act.logits_bytes * 4 // DTYPE_BYTES[setup.dtype]
    activations = max(0, act.head_saved_bytes - log_softmax) + act.grad_logits_bytes + act.grad_hidden_bytes
    return activations, DTYPE_BYTES[setup.dtype] * (head.numel if head else 0)


def embedding_grad_bytes(setup: TrainingSetup) -> tuple[int, int]:
    """(b n_e, b n_e if the lm_head is tied else 0): the token embedding's gradient, made last in backward, and a
    tied lm_head's, which waits for it.

    ``embedding_dense_backward`` makes the embedding's gradient whole (n_e = V h elements) at the very end of
    backward. A leaf used twice gets one ``AccumulateGrad`` node whose input buffer sums the contributions
    (torch/csrc/autograd/input_buffer.cpp ``InputBuffer::accumulate``), and the node, with it the ZeRO gradient
    hook, runs once the last arrives: a tied lm_head's contribution (b n_e) is made first and waits through every
    layer, and the embedding's is added to it out of place (a third b n_e). Measured with real DeepSpeed stage 3
    on the CPU (tied 32000 x 2048 head, 1 x 64 tokens): live bytes rise 3 b n_e at that ``add`` over what the
    layers leave, with the embedding's weight gathered for its backward (tests/test_lm_head_backward.py).
    """
    embedding = next((t for t in trained(setup).trainable if t.component == "embeddings"), None)  # frozen: none
    grad = DTYPE_BYTES[setup.dtype] * (embedding.numel if embedding else 0)
    return grad, grad if setup.model.tied_embeddings else 0


def _stage2_at_head_hook(setup: TrainingSetup, states: ModelStates) -> tuple[int, int]:
    """(gradient-partition bytes, bucket bytes) a stage-2 rank holds beside the lm_head's weight gradient while its
    hook runs (no offload). The hook is the first of backward, so ``setup_buckets`` allocates the reduce buckets
    there, and the gradient is copied into one before it is dropped. A gradient larger than the bucket
    (``reduce_bucket_size``) skips it: ``reduce_independent_p_g_buckets_and_remove_grads`` sends it to
    ``extra_large_param_to_reduce`` and reduces it at once, and ``copy_grads_in_partition`` then allocates the whole
    ``grads_in_partition`` on a rank whose slice overlaps it (``flat_group.stage2_grads_at_head_numel``) while the
    gradient still exists. Measured: qwen2.5-7b LoRA with its 545M-element lm_head in modules_to_save, N_d 2,
    backward 22.09 GiB = the steady 18.55 + the copy's gradient 1.02 + a bucket 0.93 + the partition 1.02 + the
    activations then (data/runs/h200-lora)."""
    if setup.stage != ZeroStage.GRADIENTS or setup.zero.offload_optimizer != "none" or not states.grads_bytes:
        return 0, 0
    tensors = trained(setup).trainable
    head = next((i for i, t in enumerate(tensors) if t.component == "lm_head"), None)
    if head is None or tensors[head].numel <= setup.zero.reduce_bucket_size:
        return 0, 0
    numels = tuple(t.numel for t in tensors)
    at_head = DTYPE_BYTES[setup.dtype] * stage2_grads_at_head_numel(numels, head, setup.world_size)
    return min(at_head, states.grads_bytes), states.buckets_bytes


def _grads_at_backward_start(setup: TrainingSetup, states: ModelStates) -> int:
    """Gradient bytes when backward begins its first layer: the carry of earlier micro-steps, or, where the
    model's own ``param.grad`` hold gradients (stages 0-1), the head's."""
    if states.grads_carry_bytes:
        return states.grads_carry_bytes
    if setup.stage <= ZeroStage.OPTIMIZER_STATES and (setup.zero.offload_optimizer == "none" or states.grads_bytes):
        return DTYPE_BYTES[setup.dtype] * _head_param_numel(setup)
    return 0


def loop_outputs_bytes(setup: TrainingSetup, act: ActivationProfile, phase: str) -> int:
    """Bytes of the model's output object that the training loop holds at ``phase``'s peak, beyond the profile's.

    ``LlamaForCausalLM.forward`` (transformers 5.x, and every ``*ForCausalLM``) returns ``CausalLMOutputWithPast``
    with ``loss`` (0-d fp32, from loss/loss_utils.py ``ForCausalLMLoss``) and ``logits`` = ``lm_head(h)``, b x s x V
    in the model's dtype: L = p * b * s * V = ``act.logits_bytes``; with ``use_cache=False`` and no
    ``output_hidden_states``/``output_attentions`` its cache, hidden states and attentions are None. The 4-byte
    loss is left out. ``ForCausalLMLoss`` upcasts a copy (``logits.float()``) and cross-entropy saves its fp32
    log-softmax, so backward never needs the logits themselves: they live only as long as the loop's reference.

    ============  =======  ==========  ======
    phase         trainer  custom-del  custom
    ============  =======  ==========  ======
    init          0        0           0
    forward       0        0           L: the previous micro-step's ``outputs`` (the last one of the previous
                                       step before micro-step 0) until this forward returns and replaces it
    backward      0        L           L
    step          0        L           L
    ============  =======  ==========  ======

    The forward's own logits are the profile's (``forward_peak_bytes``) in every loop. trainer: transformers'
    trainer.py ``compute_loss`` returns ``outputs["loss"]``, so the output dies before ``training_step`` calls
    backward; custom-del: ``del outputs`` after the step.
    """
    loop = setup.workload.loop
    if loop == Loop.TRAINER or phase == "init":
        return 0
    if phase == "forward":
        return act.logits_bytes if loop == Loop.CUSTOM else 0
    return act.logits_bytes


def timeline(setup: TrainingSetup, states: ModelStates, act: ActivationProfile) -> tuple[Phase, ...]:
    """init and the three phases of a steady training step, each with its peak's components.

    Steady state: the optimizer states exist (the first step creates them, and steady phases hold at least as much
    as the first step's). Backward's peak is at its start (head backward, the carried or head gradients) or at its
    end (all gradients, the stage-1 epilogue's flattened partition).
    """
    ckpt = setup.workload.grad_ckpt
    held = dict(params=states.params_bytes, master_weights=states.master_weights_bytes,
                optimizer_states=states.optimizer_states_bytes)
    resident = states.resident_buffers_bytes
    init_held = dict(params=states.params_bytes, master_weights=states.master_weights_bytes,
                     optimizer_states=states.optimizer_states_bytes if states.states_at_init else 0,
                     buffers=resident)
    init = Phase(name="init", components=_components(
        **init_held, temporaries=max(0, states.init_peak_bytes - sum(init_held.values()))))
    # stage 1 with G > 1 keeps its reduce buckets between micro-steps (stage_1_and_2.py: no reduction before the
    # boundary, so ``_release_ipg_buffers`` does not run)
    carry_buckets = (states.buckets_bytes if states.grads_carry_bytes and setup.stage == ZeroStage.OPTIMIZER_STATES
                     else 0)
    forward = Phase(name="forward", components=_components(
        **held, grads=states.grads_carry_bytes, buffers=resident + states.gathered_params_bytes + carry_buckets,
        activations=act.forward_peak_bytes(ckpt) + loop_outputs_bytes(setup, act, "forward")))
    # Backward, several candidate peaks. The head's backward (logits gradient, fp32 log-softmax gradient) runs before
    # any gradient hook fires, so the reduce buckets (``setup_buckets`` in the first hook) are not there yet; the
    # first layer's backward has them; the end has every gradient and, at stage 1, the flattened partition, while
    # stage 3 has released its gathered parameters after their backward use.
    gathered = resident + states.gathered_params_bytes
    grads_start = _grads_at_backward_start(setup, states)
    outputs = loop_outputs_bytes(setup, act, "backward")  # the loop's output object, beside the saved stack
    stack = act.stack_bytes(ckpt) + outputs
    head = _components(**held, grads=grads_start, buffers=gathered + carry_buckets,
                       activations=stack + act.head_saved_bytes + act.grad_logits_bytes
                       + act.backward_head_transient_bytes)
    # stages 2-3: the lm_head's weight gradient, whole, once the loss's backward has freed its fp32 tensors (at
    # stages 0-1 ``grads_start`` already holds it beside them)
    lm_acts, lm_grad = lm_head_grad_bytes(setup, act) if setup.stage >= ZeroStage.GRADIENTS else (0, 0)
    lm_partition, lm_buckets = _stage2_at_head_hook(setup, states) if lm_grad else (0, 0)
    lm_head = _components(**held, grads=max(grads_start, lm_grad + lm_partition),
                          buffers=gathered + carry_buckets + lm_buckets, activations=stack + lm_acts)
    # the embedding's gradient is made last; a tied lm_head's waits for it in autograd's input buffer through the
    # layers and is summed with it out of place (stages 0-1 count one of them in the model's ``param.grad``); stage 3
    # gathers the embedding's weight for its backward
    emb_grad, tied = embedding_grad_bytes(setup)
    keeps_param_grads = setup.stage <= ZeroStage.OPTIMIZER_STATES and states.grads_bytes > 0
    emb_end = (3 if tied else 1) * emb_grad - (emb_grad if keeps_param_grads else 0)
    if setup.stage == ZeroStage.GRADIENTS and states.grads_bytes and emb_grad:
        # stage 2: ``grads_in_partition`` of a rank whose slice lies inside the embedding appears only after it
        numels = tuple(t.numel for t in trained(setup).trainable)  # the flat group's order
        emb_end -= states.grads_bytes - DTYPE_BYTES[setup.dtype] * stage2_grads_before_embedding_numel(
            numels, setup.world_size)
    emb_gathered = emb_grad if setup.stage == ZeroStage.PARAMETERS and states.gathered_params_bytes else 0
    # from the head's first parameter gradient on (the final norm's) the first hook has allocated the buckets while
    # the head's last transients live
    late = _components(**held, grads=grads_start + tied, buffers=gathered + states.buckets_bytes,
                       activations=stack + act.head_after_grad_peak_bytes(ckpt))
    layer = _components(**held, grads=grads_start + tied,
                        buffers=gathered + states.buckets_bytes + states.recompute_gathered_bytes,
                        activations=stack + act.layer_backward_peak_bytes(ckpt))
    end = _components(**held, grads=max(states.grads_bytes, states.grads_carry_bytes),
                      buffers=resident + states.buckets_bytes + emb_gathered,
                      activations=act.backward_live_after_layers(setup.model.num_layers, ckpt) + outputs,
                      temporaries=max(states.epilogue_bytes, emb_end))
    # stage 3's buckets are resident; its gathered parameters live through the layers' backward as in ``layer``
    reducing = (gathered + states.recompute_gathered_bytes if setup.stage == ZeroStage.PARAMETERS
                else resident + states.buckets_bytes)
    during = _reduction_candidates(setup, states, act, held, grads_start + tied, reducing,
                                   outputs)
    candidates = (head, lm_head, late, layer, end, *during)
    backward = Phase(name="backward", components=max(candidates, key=lambda c: sum(c.values())),
                     candidates=candidates)
    step = Phase(name="step", components=_components(
        **held, grads=states.step_grads_bytes, buffers=resident, temporaries=states.step_temp_bytes,
        activations=loop_outputs_bytes(setup, act, "step")))
    return (init, forward, backward, step)


def _reduction_candidates(setup: TrainingSetup, states: ModelStates, act: ActivationProfile, held: dict,
                          grads_before: int, buffers: int, outputs: int) -> list[dict[str, int]]:
    """Backward's live bytes at each ZeRO-2 (or, under checkpointing, ZeRO-3) bucket reduction
    (``core.reductions``; at stage 3 the copy is the coalesced reduce-scatter's concatenation and there is no
    ``grads_in_partition``): the activations of the layers
    not yet done, of the layer in progress its share not yet walked through (``Reduction.layer_left``; under
    checkpointing that share of its recomputed intermediates), the tied head gradient until the embeddings'
    backward, the arriving gradient (b n), and either the flatten copy (b E, before the first reduction's
    ``grads_in_partition`` exists) or ``grads_in_partition`` (after it). Measured: granite-small ZeRO-2 N_d 4
    on an H200 peaks at the first reduction's flatten (data/runs/h200-families), and so does a CPU run
    (validate --cpu)."""
    b, ckpt, num_layers = DTYPE_BYTES[setup.dtype], setup.workload.grad_ckpt, setup.model.num_layers
    out = []
    for red in backward_reductions(setup):
        inside = red.layers_done < num_layers
        live = act.backward_live_after_layers(red.layers_done, ckpt) + outputs
        if red.in_layer:  # the layer in progress: the share not yet walked through
            live -= round((1 - red.layer_left) * act.per_layer_bytes(ckpt))
            live += round(red.layer_left * act.recompute_bytes) if ckpt else 0
        waiting = (grads_before if inside else 0) + b * red.arriving_numel
        flatten_grads = waiting + (0 if red.first else states.grads_bytes)
        out.append(_components(**held, grads=flatten_grads, buffers=buffers, activations=live,
                               temporaries=b * red.flattened_numel))
        out.append(_components(**held, grads=waiting + states.grads_bytes, buffers=buffers, activations=live))
    return out


def peak_phase(phases: tuple[Phase, ...]) -> Phase:
    """The phase with the largest peak (the first of equals, in run order)."""
    return max(phases, key=lambda p: p.peak_bytes)

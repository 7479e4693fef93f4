"""The activation profile of one micro-step of an HF causal LM: a value type, with nothing to compute it.

``ActivationProfile`` holds, in bytes, what one micro-batch of shape (micro_batch, seq_len) keeps alive
between the forward and the backward pass, and the transient bytes at the peaks of each phase, for pure
bf16/fp16 (or fp32) training of an HF ``*ForCausalLM`` as DeepSpeed runs it: weights in the run's dtype, no
autocast, and HF's ``ForCausalLMLoss``, which upcasts the logits to fp32. Parameter gradients are not part of
it.

Two producers fill it: ``estimator.trace.tracer.traced_profile`` runs the HF model on the meta device and
counts what autograd saves; ``estimator.core.closed_form.closed_form_profile`` writes the same terms as
formulas; ``estimator.core.activations.activation_profile`` picks one. Both check their dtype and attention
with ``check_kind``. This module imports neither, so that both can import it.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
"""Bytes of one activation element in the run's dtype."""
ATTENTIONS = ("sdpa", "flash", "eager")
"""HF ``attn_implementation`` choices the profiles model (``flash`` is flash_attention_2)."""


def check_kind(dtype: str, attn: str) -> None:
    """Raise ``ValueError`` for a dtype or attention neither producer models."""
    if attn not in ATTENTIONS:
        raise ValueError(f"unknown attention {attn!r}: use sdpa, flash or eager")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}: use bf16, fp16 or fp32")


@dataclass(frozen=True, kw_only=True)
class ActivationProfile:
    """Activation bytes of one micro-batch; the properties combine them into the phases' live bytes.

    Every field is an int of bytes (so that a profile can be scaled field by field). "Stack" below means what
    the embeddings and all layers keep for backward: ``embedding_saved_bytes + all_layers_saved_bytes`` (or
    the checkpointed counterparts).
    """

    embedding_saved_bytes: int
    """Kept for backward outside the layers before the head: input ids, embedding-side saves (dropout masks,
    gemma's scaled embedding) and what every layer shares (rotary cos/sin, attention masks), without
    checkpointing."""
    ckpt_embedding_saved_bytes: int
    """The same under HF non-reentrant gradient checkpointing (shared tensors kept as checkpoint inputs)."""
    layer_saved_bytes: int
    """Saved for backward by one decoder layer without checkpointing: distinct storages (norm fp32 upcasts and
    rstd, projections' inputs, q/k/v after rotary, attention output and fp32 logsumexp, or eager's
    probabilities,
    MLP intermediates, dropout masks)."""
    ckpt_layer_saved_bytes: int
    """Kept per layer under non-reentrant checkpointing: the layer's hidden-state input (recompute input)."""
    all_layers_saved_bytes: int
    """``num_layers * layer_saved_bytes``: all layers' saved bytes (a field so that the profile scales as a
    whole)."""
    ckpt_all_layers_saved_bytes: int
    """``num_layers * ckpt_layer_saved_bytes``."""
    head_saved_bytes: int
    """Final norm, lm_head input and loss (fp32 log-softmax output, shifted labels) saved for backward, plus
    the loss value: what the head holds at the end of forward besides the logits."""
    logits_bytes: int
    """The logits in the model's dtype, b*s*V, held by the output at the end of forward."""
    loss_transient_bytes: int
    """Extra live at the loss's own peak over stack + head_saved + logits: the fp32 upcast of the logits and
    the loss's temporaries."""
    layer_forward_transient_bytes: int
    """Extra live at the peak of one layer's forward over the stack including that layer (no checkpoints)."""
    ckpt_layer_forward_transient_bytes: int
    """The same under checkpointing: the layer's intermediates are transient, none saved."""
    grad_logits_bytes: int
    """The gradient of the logits in the model's dtype, b*s*V, at the start of backward."""
    backward_head_transient_bytes: int
    """Extra live at the head's backward peak over stack + head_saved + grad_logits: fp32 gradients of the
    log-softmax."""
    grad_hidden_bytes: int
    """Gradient of the hidden state passed from layer to layer during backward (b*s*h in dtype)."""
    layer_backward_transient_bytes: int
    """Extra live at the peak of one layer's backward over the stack with that layer's saved bytes (no
    checkpointing): grad_hidden plus gradients of the layer's intermediates."""
    ckpt_layer_backward_transient_bytes: int
    """Extra live at the peak of one layer's backward under checkpointing, over the checkpointed stack plus
    ``recompute_bytes``."""
    head_after_grad_bytes: int = 0
    """Live over the stack at the peak of the head's backward from its first parameter gradient on (the final
    norm's backward, say): the first gradient hook has allocated DeepSpeed's reduce buckets by then
    (stage_1_and_2.py ``setup_buckets``), so this peak counts with them. Traced only; 0 in closed forms."""
    ckpt_head_after_grad_bytes: int = 0
    """The same under checkpointing."""

    # -- combinations
    # -----------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """Decoder layers the totals were made for."""
        return round(self.all_layers_saved_bytes / self.layer_saved_bytes) if self.layer_saved_bytes else 0

    @property
    def recompute_bytes(self) -> int:
        """Under checkpointing, one layer's saved bytes are rebuilt during that layer's backward."""
        return self.layer_saved_bytes

    def per_layer_bytes(self, grad_ckpt: bool) -> int:
        """Bytes each layer keeps until its backward."""
        return self.ckpt_layer_saved_bytes if grad_ckpt else self.layer_saved_bytes

    def stack_bytes(self, grad_ckpt: bool) -> int:
        """Embeddings and all layers' kept bytes: the saved stack when the head starts."""
        if grad_ckpt:
            return self.ckpt_embedding_saved_bytes + self.ckpt_all_layers_saved_bytes
        return self.embedding_saved_bytes + self.all_layers_saved_bytes

    def forward_end_bytes(self, grad_ckpt: bool) -> int:
        """Live at the end of forward: the stack, the head's saved bytes and the loss, and the logits."""
        return self.stack_bytes(grad_ckpt) + self.head_saved_bytes + self.logits_bytes

    def forward_peak_bytes(self, grad_ckpt: bool) -> int:
        """Peak during forward: at the loss, or inside the last layer."""
        layer = self.ckpt_layer_forward_transient_bytes if grad_ckpt else self.layer_forward_transient_bytes
        head = self.head_saved_bytes + self.logits_bytes + self.loss_transient_bytes
        return self.stack_bytes(grad_ckpt) + max(layer, head)

    def backward_start_bytes(self, grad_ckpt: bool) -> int:
        """Live when backward begins, once the output (and its logits) has been dropped."""
        return self.stack_bytes(grad_ckpt) + self.head_saved_bytes

    def head_after_grad_peak_bytes(self, grad_ckpt: bool) -> int:
        """Live over the stack after the head's first parameter gradient (``head_after_grad_bytes``)."""
        return self.ckpt_head_after_grad_bytes if grad_ckpt else self.head_after_grad_bytes

    def layer_backward_peak_bytes(self, grad_ckpt: bool) -> int:
        """Extra over the stack at the peak of the first (deepest-stacked) layer's backward."""
        if grad_ckpt:
            return self.recompute_bytes + self.ckpt_layer_backward_transient_bytes
        return self.layer_backward_transient_bytes

    def backward_peak_bytes(self, grad_ckpt: bool) -> int:
        """Peak of activation bytes during backward, parameter gradients excluded: in the head's backward
        (fp32 log-softmax gradients) or in the last layer's backward (with its recompute under
        checkpointing)."""
        head = self.head_saved_bytes + self.grad_logits_bytes + self.backward_head_transient_bytes
        return self.stack_bytes(grad_ckpt) + max(head, self.layer_backward_peak_bytes(grad_ckpt))

    def backward_live_after_layers(self, k: int, grad_ckpt: bool) -> int:
        """Activation bytes still live once the backward of the last ``k`` layers is done (head done too).

        The last layers are the deepest: ``per_layer_bytes`` each (the deepest layer's, which a profile of
        partly frozen layers keeps), and never more than all the layers' bytes."""
        layers = self.ckpt_all_layers_saved_bytes if grad_ckpt else self.all_layers_saved_bytes
        done = min(max(0, k) * self.per_layer_bytes(grad_ckpt), layers)
        return self.stack_bytes(grad_ckpt) - done + self.grad_hidden_bytes

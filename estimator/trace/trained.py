"""Which traces a LoRA or partly frozen model needs, and the one profile they make.

The tracer's copy has 2 decoder layers. LoRA (peft freezes every base weight and wraps the same module names
in every layer) and component freezes (``embeddings``, ``norms``, ``attention``, ...) leave all layers alike:
one trace. A freeze by layer (``layers:N``, ``layers:A-B``, a glob naming a layer) makes layers of different
kinds (``core.adapters.layer_kinds``): each kind is traced on its own, with both traced layers of that kind,
and the profile adds the layers' saved bytes kind by kind (``combine``).

What changes inside a layer comes out of the trace itself, as autograd saves it (checked against real CPU
runs in tests/test_lora_activations.py): a frozen Linear saves no input (torch's generated autograd code
saves ``self`` for ``mm``/``addmm`` only when ``should_compute_output`` says the weight needs a gradient:
tools/autograd/derivatives.yaml ``mm``, ``mat2: mm_mat2_backward(grad, self, ...)``), a frozen norm weight
does not keep the normalized value, a frozen embedding keeps no input ids, and peft's ``lora.Linear.forward``
(peft 0.21 tuners/lora/layer.py: ``result + lora_B(lora_A(dropout(x))) * scaling``) saves lora_A's input
(the dropped copy with its mask when ``lora_dropout > 0``) and the r-wide lora_A output.

Whether a layer's input needs a gradient (plain mode) depends on the layers below: a frozen layer above
frozen embeddings and frozen layers has no autograd graph at all. Under checkpointing transformers' hook
(``enable_input_require_grads``) makes every layer's input need one.
"""

from __future__ import annotations

from dataclasses import replace

from zeroest.estimator.core.profile import ActivationProfile


def combine(kinds: list, profiles: list[ActivationProfile]) -> ActivationProfile:
    """One profile from each kind's (``core.adapters.LayerKind``; profiles evaluated for 1 layer): embeddings
    from the kind of layer 0, every layer's saved bytes kind by kind, the head and the transients from the kind
    of the deepest layer (the first whose backward runs, and the one recomputed first under checkpointing)."""
    first = profiles[0]
    last = next(p for k, p in zip(kinds, profiles, strict=True) if k.deepest)
    return replace(
        last,
        embedding_saved_bytes=first.embedding_saved_bytes,
        ckpt_embedding_saved_bytes=first.ckpt_embedding_saved_bytes,
        all_layers_saved_bytes=sum(k.count * p.layer_saved_bytes for k, p in zip(kinds, profiles, strict=True)),
        ckpt_all_layers_saved_bytes=sum(k.count * p.ckpt_layer_saved_bytes
                                        for k, p in zip(kinds, profiles, strict=True)),
    )

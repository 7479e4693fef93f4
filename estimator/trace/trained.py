"""Which traces a LoRA or partly frozen model needs, and the one profile they make.

The tracer's copy has 2 decoder layers. LoRA (peft freezes every base weight and wraps the same module names
in every layer) and component freezes (``embeddings``, ``norms``, ``attention``, ...) leave all layers alike:
one trace. A freeze by layer (``layers:N``, ``layers:A-B``, a glob naming a layer) makes layers of different
kinds: each kind is traced on its own, with both traced layers of that kind, and the profile adds the
layers' saved bytes kind by kind (``combine``).

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

import re
from dataclasses import dataclass, replace

from zeroest.estimator.core.adapters import Adapters, frozen_base_names
from zeroest.estimator.core.architecture import param_tensors
from zeroest.estimator.core.profile import ActivationProfile
from zeroest.estimator.core.shape import ModelShape

_LAYER = re.compile(r"\.(?:layers|h)\.(\d+)\.")
_SLOT = "\0"


@dataclass(frozen=True)
class LayerKind:
    """Layers that train alike: the traced copy's frozen names and how many real layers are of this kind."""

    frozen: frozenset[str]
    """Frozen parameter names of the 2-layer traced copy (both layers of this kind)."""
    input_grads: bool
    """The traced copy's input embeddings get transformers' require-grad hook: some real layer of this kind
    has a trainable layer below it that the copy lacks."""
    count: int
    """Real layers of this kind."""
    deepest: bool
    """The deepest layer is of this kind."""


def _template(name: str) -> tuple[int | None, str]:
    found = _LAYER.search(name)
    if not found:
        return None, name
    return int(found.group(1)), name[:found.start(1)] + _SLOT + name[found.end(1):]


def layer_kinds(shape: ModelShape, adapters: Adapters) -> list[LayerKind]:
    """The kinds of layers of ``shape`` trained with ``adapters``, in the order their first layer comes; the
    first kind holds layer 0 (its trace also gives the embeddings)."""
    frozen = frozen_base_names(shape, adapters)
    shared: set[str] = set()
    layers: dict[int, set[str]] = {}
    trains: dict[int, bool] = {}
    embeddings_train = False
    for tensor in param_tensors(shape):
        index, template = _template(tensor.name)
        if index is None:
            if tensor.name in frozen:
                shared.add(tensor.name)
            elif tensor.component in ("embeddings", "position_embeddings"):
                embeddings_train = True
            continue
        layers.setdefault(index, set())
        if tensor.name in frozen:
            layers[index].add(template)
        trains[index] = trains.get(index, False) or adapters.lora or tensor.name not in frozen
    order: list[frozenset[str]] = []
    counts: dict[frozenset[str], int] = {}
    needs_input: dict[frozenset[str], bool] = {}
    below = embeddings_train
    for index in sorted(layers):
        sig = frozenset(layers[index])
        if sig not in counts:
            order.append(sig)
        counts[sig] = counts.get(sig, 0) + 1
        natural = embeddings_train or trains[index]
        needs_input[sig] = needs_input.get(sig, False) or (index > 0 and below and not natural)
        below = below or trains[index]
    deepest = frozenset(layers[max(layers)])
    return [LayerKind(frozen=frozenset(shared | {t.replace(_SLOT, str(j)) for t in sig for j in (0, 1)}),
                      input_grads=needs_input[sig], count=counts[sig], deepest=sig == deepest) for sig in order]


def combine(kinds: list[LayerKind], profiles: list[ActivationProfile]) -> ActivationProfile:
    """One profile from each kind's (evaluated for 1 layer): embeddings from the kind of layer 0, every layer's
    saved bytes kind by kind, the head and the transients from the kind of the deepest layer (the first whose
    backward runs, and the one recomputed first under checkpointing)."""
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

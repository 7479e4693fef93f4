"""``trace.sequence.expand``: a trace of the model cut to four decoder layers, expanded, is the full-depth trace.

Equal means: the events as signed sizes in order (+bytes for an allocation, -bytes for a free), the events
themselves (both number storages in allocation order, as the recorder does, so equal serials are the renumbering),
the marks, ``saved``, ``logits``, ``grad_logits`` and ``excluded``, and ``recorder.replay`` of both. Checked for a
tiny llama and a tiny qwen2 (q/k/v biases, tied embeddings), full fine-tune and LoRA, with and without
checkpointing, expanded to 7 and 12 layers; the 12-layer direct traces and qwen2 are in the slow lane.
"""

from __future__ import annotations

import functools

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from zeroest.estimator.core.adapters import Adapters  # noqa: E402
from zeroest.estimator.trace import kinds  # noqa: E402
from zeroest.estimator.trace.model import build_model, build_trained  # noqa: E402
from zeroest.estimator.trace.recorder import replay, run_trace  # noqa: E402
from zeroest.estimator.trace.sequence import CUT_LAYERS, expand  # noqa: E402

LLAMA = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 256}
QWEN2 = {**LLAMA, "model_type": "qwen2", "tie_word_embeddings": True}
WINDOWED = {**QWEN2, "use_sliding_window": True, "sliding_window": 16}
"""qwen2 with sliding attention from layer ``max_window_layers`` up (HF ``Qwen2Config.layer_types``); the trace's
sequence (32) is longer than the window, so sliding layers run the masked kernel."""
CONFIGS = {"llama": LLAMA, "qwen2": QWEN2}
B, S = 2, 32
LORA = Adapters(lora_rank=4, lora_alpha=8, lora_targets="all-linear")


@functools.cache
def _trace(family: str, layers: int, ckpt: bool, lora: bool, max_window_layers: int | None = None):
    config = CONFIGS[family] if max_window_layers is None else {**WINDOWED, "max_window_layers": max_window_layers}
    model = build_trained(config, "bf16", "sdpa", LORA if lora else Adapters(), grad_ckpt=ckpt, num_layers=layers)
    return run_trace(model, torch.zeros((B, S), dtype=torch.long, device="meta"), grad_ckpt=ckpt)


def _signed(trace) -> list[int]:
    return [trace.sizes[e] if e >= 0 else -trace.sizes[~e] for e in trace.events]


def _depths():
    for family in CONFIGS:
        for depth in (7, 12):
            slow = family != "llama" or depth != 7
            yield pytest.param(family, depth, marks=pytest.mark.slow if slow else (), id=f"{family}-{depth}")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "ckpt"])
@pytest.mark.parametrize(("family", "depth"), list(_depths()))
def test_expanded_trace_is_the_full_depth_trace(family, depth, ckpt, lora):
    direct = _trace(family, depth, ckpt, lora)
    expanded = expand(_trace(family, CUT_LAYERS, ckpt, lora), CUT_LAYERS, depth)
    assert _signed(expanded) == _signed(direct)
    assert expanded.events == direct.events
    assert expanded.sizes == direct.sizes
    assert expanded.marks == direct.marks
    assert expanded.saved == direct.saved
    assert (expanded.logits, expanded.grad_logits) == (direct.logits, direct.grad_logits)
    assert expanded.excluded == direct.excluded
    assert replay(expanded) == replay(direct)


def test_expanding_to_the_cut_depth_gives_the_trace_back():
    cut = _trace("llama", CUT_LAYERS, True, False)
    same = expand(cut, CUT_LAYERS, CUT_LAYERS)
    assert (same.events, same.sizes, same.marks, same.saved) == (cut.events, cut.sizes, cut.marks, cut.saved)


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "ckpt"])
def test_layers_of_two_kinds_in_the_trace_are_refused(ckpt):
    # layers 0-1 full attention, 2-3 sliding: cut layers 1 and 2 differ
    cut = _trace("qwen2", CUT_LAYERS, ckpt, False, max_window_layers=2)
    with pytest.raises(ValueError, match="not all of one kind"):
        expand(cut, CUT_LAYERS, 7)


def test_layers_of_two_kinds_beyond_the_cut_are_refused_through_the_layout():
    # sliding attention from layer 5 of 7: the four cut layers are all full attention and look alike, so only the
    # full-depth model's layout (trace.kinds) shows the difference; without it the expansion is wrong
    cut = _trace("qwen2", CUT_LAYERS, False, False, max_window_layers=5)
    full = build_model({**WINDOWED, "max_window_layers": 5}, "bf16", "sdpa", num_layers=7)
    layout = kinds.layout(full)
    assert layout["kinds"] == [0] * 5 + [1] * 2
    with pytest.raises(ValueError, match="2 kinds"):
        expand(cut, CUT_LAYERS, 7, kinds=layout["kinds"])
    assert _signed(expand(cut, CUT_LAYERS, 7)) != _signed(_trace("qwen2", 7, False, False, max_window_layers=5))


@pytest.mark.parametrize(("layers", "total", "match"), [(3, 7, "needs a trace of 4"), (4, 3, "below the traced")])
def test_other_depths_are_refused(layers, total, match):
    with pytest.raises(ValueError, match=match):
        expand(_trace("llama", CUT_LAYERS, True, False), layers, total)

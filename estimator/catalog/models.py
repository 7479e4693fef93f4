"""Model presets (``data/models/*.json``), config.json files, and the standard shape behind ``--params``.

``load_model`` turns what a user typed after ``--model`` into a ``ModelShape``; ``standard_shape`` turns a
bare parameter count (``--params 1.3B``) into a llama-style decoder whose depth and width follow GPT-3's
model table.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from zeroest.estimator.catalog.files import data_path, load_json
from zeroest.estimator.core.architecture import count_params, shape_from_config
from zeroest.estimator.core.shape import ModelShape

logger = logging.getLogger(__name__)


def _models_dir() -> Path:
    """``data/models`` of the ``zeroest.data`` package."""
    return data_path("models")


def list_presets() -> list[str]:
    """Names accepted by ``load_model`` (the stems of ``data/models/*.json``), sorted."""
    names = (entry.name for entry in _models_dir().iterdir())
    return sorted(name.removesuffix(".json") for name in names if name.endswith(".json"))


def load_model(name_or_path: str) -> ModelShape:
    """A ``ModelShape`` from a preset name (``list_presets()``), a config.json, or a directory holding one."""
    label, config = load_config(name_or_path)
    return shape_from_config(config, label)


def load_config(name_or_path: str) -> tuple[str, dict]:
    """(label, HF config.json dict) of a preset name, a config.json, or a directory holding one; the label is the
    preset's name or the file's path.

    Preset names match case-insensitively. An unknown name raises ValueError with the closest preset names
    (``difflib.get_close_matches``); malformed JSON raises ValueError naming file, line and column
    (``files.load_json``).
    """
    presets = list_presets()
    key = name_or_path.strip().lower()
    if key in presets:
        return key, load_json(_models_dir() / f"{key}.json", f"model preset {key}")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"directory {str(path)!r} has no config.json: pass a model dir or a preset")
        path = path / "config.json"
    if path.is_file():
        return str(path), load_json(path, "an HF config.json")
    if _HUB_ID.fullmatch(name_or_path.strip()):
        return _hub_config(name_or_path.strip())
    import difflib  # for the suggestion only: kept off start-up

    close = difflib.get_close_matches(key, presets, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(
        f"unknown model {name_or_path!r}: not a preset or a file{hint} "
        "(`zeroest models` lists the presets)"
    )


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
"""``org/name``: a Hugging Face Hub model id, read from the local cache only."""


def _hub_config(repo_id: str) -> tuple[str, dict]:
    """(repo_id, config.json) of a Hub id from huggingface_hub's local cache (``$HF_HUB_CACHE``, else
    ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), offline; ValueError (one line) when it is not there."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        raise ValueError(f"model {repo_id!r} looks like a Hub id, which needs huggingface_hub: "
                         "pip install 'zeroest[validate]', or pass the path of its config.json") from None
    hf_home = os.environ.get("HF_HOME")
    cache = os.environ.get("HF_HUB_CACHE") or (os.path.join(hf_home, "hub") if hf_home else None)
    try:
        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache)
    except ValueError as err:  # HFValidationError: not a valid repo id
        raise ValueError(f"model {repo_id!r}: not a preset, a file or a valid Hub id ({err})") from None
    if not isinstance(found, str):
        where = cache or "the default cache"
        raise ValueError(f"model {repo_id!r} is not in the local Hugging Face cache ({where}): download its "
                         f"config.json once (`hf download {repo_id} config.json`) or pass a config.json path")
    return repo_id, load_json(Path(found), f"the cached config.json of {repo_id}")


@dataclass(frozen=True, kw_only=True)
class _Gpt3Row:
    """One row of Brown et al. 2020 (arXiv 2005.14165), Table 2.1."""

    n_params: int
    """Nominal size ("125M" ... "175B")."""
    num_layers: int
    """n_layers."""
    hidden_size: int
    """d_model."""
    head_dim: int
    """d_head; heads = d_model / d_head."""


# Table 2.1 of arXiv 2005.14165, two rows corrected so that heads * d_head == d_model: GPT-3 XL lists 24
# heads of 128 for d_model 2048 (we use 16 heads of 128); GPT-3 13B lists d_model 5140 for 40 heads of 128
# (we use 5120).
GPT3_TABLE: tuple[_Gpt3Row, ...] = (
    _Gpt3Row(n_params=125_000_000, num_layers=12, hidden_size=768, head_dim=64),
    _Gpt3Row(n_params=350_000_000, num_layers=24, hidden_size=1024, head_dim=64),
    _Gpt3Row(n_params=760_000_000, num_layers=24, hidden_size=1536, head_dim=96),
    _Gpt3Row(n_params=1_300_000_000, num_layers=24, hidden_size=2048, head_dim=128),
    _Gpt3Row(n_params=2_700_000_000, num_layers=32, hidden_size=2560, head_dim=80),
    _Gpt3Row(n_params=6_700_000_000, num_layers=32, hidden_size=4096, head_dim=128),
    _Gpt3Row(n_params=13_000_000_000, num_layers=40, hidden_size=5120, head_dim=128),
    _Gpt3Row(n_params=175_000_000_000, num_layers=96, hidden_size=12288, head_dim=128),
)
STANDARD_VOCAB = 32000
"""Vocabulary of the standard shape: Llama/Llama-2's 32000 tokens."""
INTERMEDIATE_MULTIPLES = (256, 128, 64, 32, 16, 8)
"""intermediate_size is a multiple of the first that fits (Llama's ``multiple_of=256``, meta-llama/llama
model.py), finer only where 256 is too coarse."""
_GOOD_FIT = 0.005
_MAX_MISFIT = 0.01


def _depth_width(n_params: int) -> tuple[int, float, int]:
    """(layers, unrounded d_model, d_head), log-linear in Table 2.1 (extrapolated past its ends)."""
    x = math.log(n_params)
    seg = 0
    while seg < len(GPT3_TABLE) - 2 and x > math.log(GPT3_TABLE[seg + 1].n_params):
        seg += 1
    lo, hi = GPT3_TABLE[seg], GPT3_TABLE[seg + 1]
    t = (x - math.log(lo.n_params)) / (math.log(hi.n_params) - math.log(lo.n_params))
    layers = max(1, round(math.exp((1 - t) * math.log(lo.num_layers) + t * math.log(hi.num_layers))))
    width = math.exp((1 - t) * math.log(lo.hidden_size) + t * math.log(hi.hidden_size))
    return layers, width, (lo if t < 0.5 else hi).head_dim


def _llama_shape(name: str, layers: int, width: int, head_dim: int, intermediate: int) -> ModelShape:
    return ModelShape(
        name=name, family="llama", vocab_size=STANDARD_VOCAB, hidden_size=width, num_layers=layers,
        num_heads=width // head_dim, num_kv_heads=width // head_dim, head_dim=head_dim,
        intermediate_size=intermediate, max_positions=4096, gated_mlp=True, tied_embeddings=False,
        norm="rmsnorm", positions="rotary", attention_bias=False, extra={"hidden_act": "silu"},
    )


def _label(n_params: int) -> str:
    for suffix, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n_params >= scale:
            return f"{n_params / scale:.3g}{suffix}"
    return str(n_params)


def _fit_intermediate(shape: ModelShape, n_params: int, multiple: int) -> tuple[float, ModelShape]:
    """(relative misfit, shape) with the multiple of ``multiple`` that brings the total nearest n_params."""
    fixed = count_params(shape).total  # shape has intermediate_size 0
    slope = 3 * shape.num_layers * shape.hidden_size  # gate_proj, up_proj, down_proj: each d x I
    ideal = (n_params - fixed) / slope / multiple
    fits = []
    for units in {max(1, math.floor(ideal)), max(1, math.ceil(ideal))}:
        misfit = abs(fixed + slope * units * multiple - n_params) / n_params
        fits.append((misfit, units * multiple))
    misfit, intermediate = min(fits)
    return misfit, replace(shape, intermediate_size=intermediate)


def standard_shape(n_params: int) -> ModelShape:
    """A llama-style decoder of about ``n_params`` parameters, for ``--params`` without ``--model``.

    Architecture: Llama (rotary positions, RMSNorm, gated SwiGLU MLP, untied lm_head, multi-head
    attention, vocabulary ``STANDARD_VOCAB`` = 32000), family ``"llama"``, max_positions 4096.

    Rule (L layers, d = d_model, d_head, I = intermediate_size):

    1. L and d are interpolated log-linearly in log(n_params) between the two neighbouring rows of
       GPT-3's model table (Brown et al. 2020, Table 2.1, ``GPT3_TABLE``; extrapolated from the end rows
       outside 125M..175B). L is rounded to an integer, d_head is that of the nearer row, d is rounded to
       a multiple of d_head and heads = d / d_head: at a row's own size, that row's L, d and heads.
    2. I is the multiple of 256 that brings ``count_params(shape).total`` nearest n_params (the total is
       linear in I, slope 3 L d). Where a step of 256 is too coarse to land within 0.5% (small models:
       3 L d 256 is 2.9% of 1.3B at the 1.3B row), the coarsest of 128, 64, 32, 16, 8 that does.
    3. Below 125M only, if that misses by more than 0.5%, d is narrowed by whole heads until it fits
       (the 32000-token embedding and lm_head hold 64000 d parameters). A fit worse than 1% raises
       ValueError (below about 5M parameters nothing fits).

    ``name`` is e.g. ``"1.3B (standard llama-style shape)"``.
    """
    if isinstance(n_params, bool) or not isinstance(n_params, int) or n_params <= 0:
        raise ValueError(f"standard_shape needs a positive integer parameter count, got {n_params!r}")
    name = f"{_label(n_params)} (standard llama-style shape)"
    layers, width_f, head_dim = _depth_width(n_params)
    width = max(1, round(width_f / head_dim)) * head_dim
    # Below the table, the 32000-token embedding can outgrow the extrapolated width: narrow by whole heads.
    widths = range(width, 0, -head_dim) if n_params < GPT3_TABLE[0].n_params else (width,)
    for width in widths:
        bare = _llama_shape(name, layers, width, head_dim, 0)
        fits = [_fit_intermediate(bare, n_params, multiple) for multiple in INTERMEDIATE_MULTIPLES]
        misfit, shape = next((fit for fit in fits if fit[0] <= _GOOD_FIT), min(fits, key=lambda fit: fit[0]))
        if misfit <= _GOOD_FIT:
            break
    if misfit > _MAX_MISFIT:
        raise ValueError(
            f"cannot build a standard llama-style shape within 1% of {n_params:,} parameters (closest: "
            f"{count_params(shape).total:,}): its 32000-token embedding and lm_head alone hold more; pass a "
            "larger --params, or a --model"
        )
    logger.debug("standard shape for %d params: %s (misfit %.4f)", n_params, shape, misfit)
    return replace(shape, nominal_params=n_params)

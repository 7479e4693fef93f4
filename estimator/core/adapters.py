"""Which parameters train: peft LoRA adapters, ``modules_to_save`` copies and frozen base weights.

``Adapters`` is the setup's part for it; ``trainable_split`` lists the tensors of the model as peft builds it
(peft 0.21 ``tuners/lora/model.py`` ``LoraModel._create_and_replace``, ``tuners/lora/layer.py``
``LoraLayer.update_layer``, ``utils/other.py`` ``ModulesToSaveWrapper``), split into trainable and frozen, in
``named_parameters`` order.

Closed form, per LoRA-wrapped Linear of weight shape (out, in) and rank r: ``lora_A`` is ``nn.Linear(in, r,
bias=False)`` (r * in) and ``lora_B`` is ``nn.Linear(r, out, bias=False)`` (out * r), so it adds r * (in + out)
trainable elements; the base layer's weight and bias freeze (``_mark_only_adapters_as_trainable``, bias="none").
A module in ``modules_to_save`` keeps its original (frozen) and gains a trainable deep copy of all its parameters.

Freeze patterns (``--freeze``, comma-separated, for the base weights of any setup):

* ``embeddings``: token and learned position embeddings (and opt's project_in/out);
* ``lm_head``, ``norms``, ``attention``, ``mlp``: that component;
* ``layers:N``: the first N decoder layers (0 .. N-1); ``layers:A-B``: layers A to B inclusive;
* anything else: a glob over HF parameter names, e.g. ``*.self_attn.*`` (``fnmatch``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import lru_cache

from zeroest.estimator.core.architecture import COMPONENTS, ParamTensor, param_tensors
from zeroest.estimator.core.shape import ModelShape
from zeroest.estimator.core.vocab import BaseQuant, choice

ALL_LINEAR = "all-linear"
"""peft's ``target_modules="all-linear"``: every Linear/Conv1D but the output layer
(tuners_utils.py ``_maybe_include_all_linear_layers``)."""
PEFT_PREFIX = "base_model.model."
"""``PeftModel`` names every parameter under ``base_model.model.``."""
_LAYER = re.compile(r"\.(?:layers|h)\.(\d+)\.")
_MIXTRAL_NAMES = ("gate", "w1", "w2", "w3")
_QWEN2_MOE_NAMES = ("gate", "gate_proj", "up_proj", "down_proj")
PEFT_MOE_CONVERTED: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("mixtral", "minimax", "minimax_m2"), _MIXTRAL_NAMES),
    **dict.fromkeys(("qwen3_moe", "qwen3_next", "qwen3_omni_moe", "qwen3_omni_moe_text", "qwen3_omni_moe_thinker",
                     "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1", "ernie4_5_moe", "glm4_moe",
                     "glm4_moe_lite", "glm_moe_dsa", "glm4v_moe", "longcat_flash", "solar_open", "mellum", "beam",
                     "hunyuan_v1_moe", "flex_olmo", "olmoe", "sarvam_mla", "exaone_moe", "cohere2_moe", "afmoe"),
                    _QWEN2_MOE_NAMES),
}
"""Families whose LoRA targets peft 0.21 rewrites for transformers v5's fused experts, and the v4 module names it
rewrites (utils/transformers_weight_conversion.py ``_convert_peft_config_moe``, run by tuners_utils.py
``BaseTuner.inject_adapter`` for every model_type transformers' ``_MODEL_TO_CONVERSION_PATTERN`` maps to mixtral or
qwen2_moe, ``_MOE_TARGET_MODULE_MAPPING``): ``all-linear`` resolves to the Linears' names plus all of these, and
each such name becomes a ``target_parameters`` entry (``gate.weight``, ``gate_up_proj`` at rank 2r,
``down_proj``), wrapped by ``lora.ParamWrapper``; the dense Linears of the same names then get no adapter."""


def _axis(default, flag: str, help: str):
    """Same metadata as ``core.setup.axis`` (not imported: setup imports this module)."""
    return field(default=default, metadata={"flag": flag, "help": help, "key": None, "count": False})


def name_list(text: str) -> tuple[str, ...]:
    """The names of a comma-separated option (``--lora-targets``, ``--modules-to-save``, ``--freeze``)."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


@dataclass(frozen=True, kw_only=True)
class Adapters:
    """LoRA (peft) and frozen parameters. The defaults are a full fine-tune: every parameter trains."""

    lora_rank: int | None = _axis(None, "--lora-rank", "peft LoRA rank r (0 or unset: full fine-tune).")
    """LoRA rank r; None (or 0) trains the whole model."""
    lora_alpha: int | None = _axis(None, "--lora-alpha", "LoRA alpha (scaling only; no memory of its own). "
                                   "Default: peft's 8.")
    """``LoraConfig.lora_alpha``: scales B A by alpha / r; recorded for the validator, no memory term."""
    lora_dropout: float = _axis(0.0, "--lora-dropout", "LoRA dropout probability (adds a mask per wrapped layer).")
    """``LoraConfig.lora_dropout``: above 0 each wrapped layer saves a dropout mask of its input."""
    lora_targets: str = _axis(ALL_LINEAR, "--lora-targets", "Modules LoRA wraps: all-linear, or comma-separated "
                              "module names such as q_proj,v_proj.")
    """``LoraConfig.target_modules``: ``all-linear`` or names matched as peft does (``check_target_module_exists``:
    the module's name equals a target or ends with ``.`` + target)."""
    modules_to_save: str = _axis("", "--modules-to-save", "Comma-separated modules trained whole next to LoRA "
                                 "(e.g. lm_head,embed_tokens).")
    """``LoraConfig.modules_to_save``: each matched module gets a full trainable copy."""
    freeze: str = _axis("", "--freeze", "Comma-separated frozen base weights: embeddings, lm_head, norms, "
                        "attention, mlp, layers:N (first N), layers:A-B, or a name glob.")
    """Freeze patterns, the language in this module's docstring."""
    base_quant: BaseQuant = _axis(BaseQuant.NONE, "--base-quant", "QLoRA: the frozen base's Linear weights stored "
                                  "as bitsandbytes 4-bit NF4 (nf4), with double quantisation (nf4-dq), or not "
                                  "(none). Unvalidated.")
    """``core.qlora``: bitsandbytes ``Linear4bit`` storage of the frozen base (QLoRA); needs LoRA."""

    def __post_init__(self) -> None:
        rank = self.lora_rank
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
            raise ValueError(f"the LoRA rank must be a whole number >= 0, got {rank!r} (set --lora-rank)")
        if rank == 0:
            object.__setattr__(self, "lora_rank", None)
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r} (set --lora-dropout)")
        if not name_list(self.lora_targets):
            raise ValueError("--lora-targets is empty: give all-linear or module names such as q_proj,v_proj")
        for pattern in name_list(self.freeze):
            _layer_range(pattern)  # raises on a malformed layers: pattern
        if name_list(self.modules_to_save) and self.lora_rank is None:
            raise ValueError(f"--modules-to-save {self.modules_to_save} trains a whole copy of those modules next to "
                             "LoRA adapters (peft's LoraConfig.modules_to_save), so it needs --lora-rank: set it, or "
                             "drop --modules-to-save (--freeze trains chosen weights without LoRA)")
        object.__setattr__(self, "base_quant", choice(BaseQuant, self.base_quant, "--base-quant"))
        if self.base_quant != BaseQuant.NONE and self.lora_rank is None:
            raise ValueError(f"--base-quant {self.base_quant} freezes the base in 4 bits, which trains only through "
                             "adapters (QLoRA): set --lora-rank, or drop --base-quant")

    @property
    def lora(self) -> bool:
        """LoRA adapters are on."""
        return self.lora_rank is not None

    @property
    def full(self) -> bool:
        """A plain full fine-tune: nothing frozen, no adapters."""
        return not self.lora and not name_list(self.freeze) and not name_list(self.modules_to_save)


@dataclass(frozen=True, kw_only=True)
class TrainableSplit:
    """The model's tensors as trained: ``trainable`` then ``frozen``, each in ``named_parameters`` order."""

    trainable: tuple[ParamTensor, ...]
    """Parameters with ``requires_grad``: LoRA A/B, modules_to_save copies, unfrozen base weights."""
    frozen: tuple[ParamTensor, ...]
    """Base weights with ``requires_grad=False``."""

    @property
    def trainable_numel(self) -> int:
        """Trainable elements (peft's ``print_trainable_parameters`` "trainable params")."""
        return sum(t.numel for t in self.trainable)

    @property
    def frozen_numel(self) -> int:
        """Frozen elements."""
        return sum(t.numel for t in self.frozen)

    @property
    def total_numel(self) -> int:
        """Every parameter (peft's "all params")."""
        return self.trainable_numel + self.frozen_numel


def _layer_range(pattern: str) -> range | None:
    if not pattern.startswith("layers:"):
        return None
    spec = pattern.removeprefix("layers:")
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", spec)
    if not match:
        raise ValueError(f"--freeze pattern {pattern!r}: write layers:N (the first N) or layers:A-B")
    lo, hi = match.groups()
    return range(int(lo)) if hi is None else range(int(lo), int(hi) + 1)


def _frozen_by(tensor: ParamTensor, patterns: tuple[str, ...]) -> bool:
    for pattern in patterns:
        layers = _layer_range(pattern)
        index = _LAYER.search(tensor.name)
        if layers is not None:
            if index and int(index.group(1)) in layers:
                return True
        elif pattern == "embeddings":
            if tensor.component in ("embeddings", "position_embeddings"):
                return True
        elif pattern in COMPONENTS:
            if tensor.component == pattern:
                return True
        elif fnmatchcase(tensor.name, pattern):
            return True
    return False


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _matches(module: str, targets: tuple[str, ...]) -> bool:
    """peft tuners_utils.py ``check_target_module_exists``: equal, or ends with ``.`` + target."""
    return any(module == t or module.endswith(f".{t}") for t in targets)


def _is_target(tensor: ParamTensor, adapters: Adapters) -> bool:
    if tensor.linear_shape is None:
        return False
    module = _module(tensor.name)
    targets = name_list(adapters.lora_targets)
    if targets == (ALL_LINEAR,):
        return tensor.component != "lm_head"
    return _matches(module, targets)


def _saved_copies(model: ModelShape, module: str, tensors: tuple[ParamTensor, ...]) -> list[ParamTensor]:
    """``ModulesToSaveWrapper``: ``modules_to_save.default`` is a deep copy of the module, all trainable, registered
    after ``original_module``, so its tensors follow the original's in ``named_parameters``. A tied lm_head is not in
    ``named_parameters`` (its weight is the embedding's), but its copy is a new tensor."""
    own = [t for t in tensors if _module(t.name) == module]
    if not own and module == "lm_head" and model.tied_embeddings:
        embed = next(t for t in tensors if t.component == "embeddings")
        return [ParamTensor(name="lm_head.modules_to_save.default.weight", numel=embed.numel, component="lm_head")]
    return [ParamTensor(name=f"{module}.modules_to_save.default.{t.name.rsplit('.', 1)[1]}", numel=t.numel,
                        component=t.component) for t in own]


def _check_moe_targets(model: ModelShape, adapters: Adapters) -> None:
    """A ValueError (one line) when peft would put LoRA on the router or the fused experts (``PEFT_MOE_CONVERTED``):
    ``lora.ParamWrapper`` (peft 0.21 tuners/lora/layer.py) registers ``W + B A`` as a parametrization of the
    expert tensor, so each forward materialises a (E, out, in) weight per wrapped tensor, not modelled here."""
    names = PEFT_MOE_CONVERTED.get(model.family)
    targets = name_list(adapters.lora_targets)
    if not adapters.lora or names is None:
        return
    hit = sorted(n for n in names if targets == (ALL_LINEAR,) or any(t == n or t.endswith(f".{n}") for t in targets))
    if hit:
        attention = dict.fromkeys(_module(t.name).rsplit(".", 1)[-1] for t in param_tensors(model)
                                  if t.linear_shape and t.component == "attention")
        raise ValueError(f"--lora-targets {adapters.lora_targets!r} on {model.family} model {model.name}: peft 0.21 "
                         f"wraps the router and the fused 3-D experts ({', '.join(hit)}) as parameters "
                         "(lora.ParamWrapper), which is not modelled: use --lora-targets "
                         f"{','.join(attention) or 'q_proj,k_proj,v_proj,o_proj'}")


@lru_cache(maxsize=1024)
def trainable_split(model: ModelShape, adapters: Adapters) -> TrainableSplit:
    """The model's parameters as peft (or a freeze) leaves them, in ``named_parameters`` order: LoRA A/B after each
    wrapped weight, a ``modules_to_save`` copy after its module's original tensors."""
    _check_moe_targets(model, adapters)
    tensors = param_tensors(model)
    freeze = name_list(adapters.freeze)
    saved = name_list(adapters.modules_to_save)
    trainable: list[ParamTensor] = []
    frozen: list[ParamTensor] = []
    r = adapters.lora_rank
    for i, t in enumerate(tensors):
        (frozen if adapters.lora or _frozen_by(t, freeze) else trainable).append(t)
        if adapters.lora and _is_target(t, adapters):
            out, n_in = t.linear_shape
            module = _module(t.name)
            trainable.append(ParamTensor(name=f"{module}.lora_A.default.weight", numel=r * n_in,
                                         component=t.component))
            trainable.append(ParamTensor(name=f"{module}.lora_B.default.weight", numel=out * r,
                                         component=t.component))
        module = _module(t.name)
        last_of_module = i + 1 == len(tensors) or _module(tensors[i + 1].name) != module
        if last_of_module and _matches(module, saved):
            trainable.extend(_saved_copies(model, module, tensors))
    if adapters.lora and not any(_is_target(t, adapters) for t in tensors):
        raise ValueError(f"--lora-targets {adapters.lora_targets!r} matches no Linear of {model.name}: use "
                         "all-linear or module names such as q_proj,v_proj")
    for pattern in freeze:
        if not any(_frozen_by(t, (pattern,)) for t in tensors):
            tied = " (its lm_head is tied to the embeddings: freeze embeddings)" if pattern == "lm_head" else ""
            raise ValueError(f"--freeze {pattern!r} matches no parameter of {model.name}{tied}: use embeddings, "
                             "lm_head, norms, attention, mlp, layers:N, layers:A-B or a glob over HF parameter "
                             "names such as *.self_attn.*")
    if "lm_head" in saved and model.tied_embeddings and not any(_module(t.name) == "lm_head" for t in tensors):
        trainable.extend(_saved_copies(model, "lm_head", tensors))
    return TrainableSplit(trainable=tuple(trainable), frozen=tuple(frozen))


def frozen_base_names(model: ModelShape, adapters: Adapters) -> frozenset[str]:
    """HF names of the base weights that do not train: every one under LoRA (peft freezes the base model:
    tuners_utils.py ``BaseTuner._mark_only_adapters_as_trainable``), else those the freeze patterns match."""
    freeze = name_list(adapters.freeze)
    return frozenset(t.name for t in param_tensors(model) if adapters.lora or _frozen_by(t, freeze))

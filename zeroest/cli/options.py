"""The options predict and plan share, and turning them into a TrainingSetup.

Typer parameters are declared once here as ``Annotated`` aliases so every command spells a flag the same way.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from zeroest.estimator.core.setup import Optimizer, Parallelism, TrainingSetup, Workload, ZeroConfig
from zeroest.estimator.core.shape import ModelShape
from zeroest.estimator.units import parse_count


class Dtype(str, Enum):
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class OptName(str, Enum):
    adamw = "adamw"
    adam = "adam"
    sgd = "sgd"
    sgd_momentum = "sgd-momentum"
    adafactor = "adafactor"


class OptImpl(str, Enum):
    fused = "fused"
    torch = "torch"
    cpu = "cpu"


class Offload(str, Enum):
    none = "none"
    cpu = "cpu"
    nvme = "nvme"


class Attn(str, Enum):
    sdpa = "sdpa"
    flash = "flash"
    eager = "eager"


class ActMode(str, Enum):
    traced = "traced"
    closed_form = "closed-form"


def _count(text: str) -> int:
    return parse_count(text)


ParamsOpt = Annotated[str | None, typer.Option("--params", help="Model size, e.g. 1.3B or 350M: a standard "
                                               "llama-style decoder of that size.")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="A preset (zeroest models lists them) or a path to an "
                                              "HF config.json or its folder.")]
GpusOpt = Annotated[int, typer.Option("--gpus", help="GPUs (data-parallel ranks) per node.")]
NodesOpt = Annotated[int, typer.Option("--nodes", help="Nodes.")]
DtypeOpt = Annotated[Dtype, typer.Option("--dtype", help="Training precision.")]
OptOpt = Annotated[OptName, typer.Option("--optimizer", help="Optimizer.")]
ImplOpt = Annotated[OptImpl | None, typer.Option("--optimizer-impl", help="fused: DeepSpeed FusedAdam; torch: "
                    "torch_adam (foreach AdamW); cpu: DeepSpeedCPUAdam. Default: cpu with optimizer offload, "
                    "fused otherwise (torch for SGD/Adafactor).")]
OffOptOpt = Annotated[Offload, typer.Option("--offload-optimizer", help="Where master weights and optimizer "
                      "states live.")]
OffParOpt = Annotated[Offload, typer.Option("--offload-params", help="Where stage 3 keeps parameter partitions.")]
AccumOpt = Annotated[int, typer.Option("--grad-accum", help="Gradient accumulation steps.")]
OverlapOpt = Annotated[bool | None, typer.Option("--overlap-comm/--no-overlap-comm", help="Overlap reduction with "
                       "backward (DeepSpeed's default: on for stage 3 only).", show_default=False)]
BucketOpt = Annotated[str | None, typer.Option(help="Elements, e.g. 5e8 or 500M. Default: DeepSpeed's.")]
MicroOpt = Annotated[int, typer.Option("--micro-batch", help="Sequences per GPU per micro-step.")]
SeqOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per sequence.")]
CkptOpt = Annotated[bool, typer.Option("--grad-ckpt", help="HF non-reentrant gradient checkpointing.")]
AttnOpt = Annotated[Attn, typer.Option("--attn", help="Attention implementation.")]
ActOpt = Annotated[ActMode | None, typer.Option("--activations", help="traced (meta-device trace of the HF model; "
                   "needs torch and transformers) or closed-form. Default: traced when possible.")]


def resolve_model(params: str | None, model: str | None) -> ModelShape:
    """The ModelShape from exactly one of --params and --model."""
    if (params is None) == (model is None):
        raise ValueError("give exactly one of --params (e.g. --params 1.3B) and --model (a preset or config.json)")
    if params is not None:
        from zeroest.estimator.catalog.models import standard_shape

        return standard_shape(parse_count(params))
    from zeroest.estimator.catalog.models import load_model

    return load_model(model)


def default_impl(optimizer: str, offload_optimizer: str) -> str:
    if offload_optimizer != "none":
        return "cpu"
    return "fused" if optimizer in ("adam", "adamw") else "torch"


def build_setup(
    *, shape: ModelShape, stage: int, gpus: int, nodes: int, dtype: str, optimizer: str, impl: str | None,
    offload_optimizer: str, offload_params: str, grad_accum: int, overlap_comm: bool | None,
    knobs: dict[str, str | None], micro_batch: int, seq_len: int, grad_ckpt: bool, attn: str,
    activations: str | None, from_params: bool, paper: bool = False,
) -> TrainingSetup:
    """Validate the flags once and build the setup; ValueError says which flag is wrong."""
    zero_knobs = {name: parse_count(value) for name, value in knobs.items() if value is not None}
    mode = activations or ("closed-form" if from_params else "auto")
    return TrainingSetup(
        model=shape,
        parallel=Parallelism(gpus_per_node=gpus, nodes=nodes),
        dtype=dtype,
        optimizer=Optimizer(name=optimizer, impl=impl or default_impl(optimizer, offload_optimizer)),
        zero=ZeroConfig(stage=stage, overlap_comm=overlap_comm, offload_optimizer=offload_optimizer,
                        offload_params=offload_params, **zero_knobs),
        workload=Workload(micro_batch=micro_batch, seq_len=seq_len, grad_accum=grad_accum, grad_ckpt=grad_ckpt,
                          attn=attn, activations=mode),
        mode="paper" if paper else "deepspeed",
    )

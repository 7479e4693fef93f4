"""zeroest: per-GPU memory of DeepSpeed ZeRO training, predicted and checked against real runs.

Library use::

    from zeroest import TrainingSetup, estimate, load_model
    est = estimate(TrainingSetup(model=load_model("llama-3-8b"), parallel=Parallelism(gpus_per_node=8)))
    est.peak_allocated_bytes
"""

from zeroest.estimator.estimate import Estimate, estimate
from zeroest.estimator.overheads import Overheads
from zeroest.estimator.setup import (
    Optimizer,
    Parallelism,
    TrainingSetup,
    Workload,
    ZeroConfig,
    ZeroStage,
)

__version__ = "0.1.0"


def load_model(name_or_path: str):
    """A ModelShape from a preset name or an HF config.json path."""
    from zeroest.estimator.presets import load_model as _load

    return _load(name_or_path)


__all__ = [
    "Estimate", "Optimizer", "Overheads", "Parallelism", "TrainingSetup", "Workload", "ZeroConfig", "ZeroStage",
    "__version__", "estimate", "load_model",
]

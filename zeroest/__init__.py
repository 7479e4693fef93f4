"""zeroest: per-GPU memory of DeepSpeed ZeRO training, predicted and checked against real runs.

Library use::

    from zeroest import Parallelism, TrainingSetup, estimate, load_model
    setup = TrainingSetup(model=load_model("llama-3-8b"), parallel=Parallelism(gpus_per_node=8))
    estimate(setup).peak_allocated_bytes

Names are imported on first use, so ``import zeroest.estimator.units`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Estimate": "zeroest.estimator.estimate",
    "estimate": "zeroest.estimator.estimate",
    "Overheads": "zeroest.estimator.overheads",
    "Optimizer": "zeroest.estimator.setup",
    "Parallelism": "zeroest.estimator.setup",
    "TrainingSetup": "zeroest.estimator.setup",
    "Workload": "zeroest.estimator.setup",
    "ZeroConfig": "zeroest.estimator.setup",
    "ZeroStage": "zeroest.estimator.setup",
    "ModelShape": "zeroest.estimator.shape",
    "load_model": "zeroest.estimator.presets",
    "standard_shape": "zeroest.estimator.presets",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'zeroest' has no attribute {name!r}")

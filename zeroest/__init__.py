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
    "Estimate": "zeroest.estimator.core.estimate",
    "estimate": "zeroest.estimator.core.estimate",
    "Overheads": "zeroest.estimator.core.overheads",
    "Optimizer": "zeroest.estimator.core.setup",
    "Parallelism": "zeroest.estimator.core.setup",
    "TrainingSetup": "zeroest.estimator.core.setup",
    "Workload": "zeroest.estimator.core.setup",
    "ZeroConfig": "zeroest.estimator.core.setup",
    "ZeroStage": "zeroest.estimator.core.setup",
    "ModelShape": "zeroest.estimator.core.shape",
    "load_model": "zeroest.estimator.catalog.models",
    "standard_shape": "zeroest.estimator.catalog.models",
    "watch": "zeroest.watch",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'zeroest' has no attribute {name!r}")

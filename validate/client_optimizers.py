"""Optimizers DeepSpeed does not build from ds_config, built here and passed as ``deepspeed.initialize(optimizer=...)``.

bitsandbytes' ``AdamW8bit`` and ``PagedAdamW8bit`` have no ds_config type: a job builds them itself and hands them to
DeepSpeed as a client optimizer, which ZeRO accepts only with ``zero_allow_untested_optimizer: true``
(``estimator.configs.ds_write`` writes it and no optimizer section) and never with optimizer offload
(engine.py ``_configure_optimizer`` raises ZeRORuntimeException). The worker calls::

    optimizer = client_optimizer(spec, params)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer, config=...)

where ``optimizer`` None means "DeepSpeed builds it from ds_config", as today.
"""

from __future__ import annotations

from zeroest.estimator.configs.ds_write import LEARNING_RATE

BNB_CLASSES = {"adamw-8bit": "AdamW8bit", "paged-adamw-8bit": "PagedAdamW8bit"}
"""Our optimizer name -> the bitsandbytes.optim class (its defaults: ``min_8bit_size`` 4096, block size 256)."""
WEIGHT_DECAY = 0.01
"""The same weight decay the ds_config's AdamW gets (``ds_write``); memory does not depend on it."""


def client_optimizer(spec: dict, params: list):
    """The client optimizer the run's setup names, over ``params``; None when DeepSpeed builds it from ds_config.

    ``spec["setup"]`` is the flat setup dict (``optimizer`` its name). bitsandbytes is imported only here.
    """
    name = str(spec["setup"].get("optimizer", "adamw"))
    if name not in BNB_CLASSES:
        return None
    try:
        import bitsandbytes
    except ImportError as error:
        raise RuntimeError(f"--optimizer {name} runs bitsandbytes, which is not installed here: "
                           "pip install bitsandbytes") from error
    cls = getattr(bitsandbytes.optim, BNB_CLASSES[name])
    return cls(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)

"""``ZeroestCallback``: the HF Trainer's job as a validation run (``zeroest.watch`` for the Trainer's loop).

::

    trainer = Trainer(model=model, args=TrainingArguments(..., deepspeed="ds_config.json"),
                      callbacks=[ZeroestCallback(out="runs/watch.jsonl")])

The Trainer's hooks cannot split a micro-step into its phases (transformers 5.x trainer.py ``_run_epoch``):
``on_step_begin`` comes before the first micro-step's forward, ``on_substep_end`` after each micro-step but the
last, ``on_pre_optimizer_step`` / ``on_optimizer_step`` / ``on_step_end`` after the last; and under DeepSpeed the
optimizer step runs inside ``accelerator.backward`` (accelerate/utils/deepspeed.py
``DeepSpeedEngineWrapper.backward`` calls ``engine.backward`` then, at the boundary, ``engine.step``), while
``optimizer.step()`` is a no-op (``DeepSpeedOptimizerWrapper.step``). So at ``on_train_begin`` the callback finds
the DeepSpeed engine (the Trainer has built it by then: ``Trainer.model_wrapped``) and watches it as
``zeroest.watch`` does, forward, backward and step each measured where the engine runs them; ``on_train_end``
stops a watch that has not yet seen its ``steps``.

The hooks are given the HF model, not the engine, so the engine is the ``DeepSpeedEngine`` whose ``module`` is
that model, found through the garbage collector's referrers (once). The Trainer's loop keeps only the loss of the
forward (``compute_loss``), so the loop is ``trainer`` unless seen otherwise.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

from transformers import TrainerCallback

log = logging.getLogger("zeroest.watch")


def find_engine(model):
    """The ``DeepSpeedEngine`` wrapping ``model`` (its ``module``), or None."""
    from deepspeed import DeepSpeedEngine

    if isinstance(model, DeepSpeedEngine):
        return model
    holders = gc.get_referrers(model)
    for holder in list(holders):
        if isinstance(holder, dict):
            holders += gc.get_referrers(holder)
    for holder in holders:
        if isinstance(holder, DeepSpeedEngine) and holder.__dict__.get("module") is model:
            return holder
    return None


class ZeroestCallback(TrainerCallback):
    """Watch the first ``steps`` optimizer steps of a DeepSpeed Trainer job; the keywords are ``zeroest.watch``'s
    (``loop`` is seen as in a custom loop: ``trainer``, since the Trainer keeps only the loss). ``watch`` is the
    ``Watch`` once training began, ``result`` its ``WatchResult`` once it stopped."""

    def __init__(self, *, steps: int = 3, out: str | Path | None = None, threshold: float = 0.05,
                 zero_init: bool | None = None, loop: str | None = None, seq_len: int | None = None,
                 run_id: str | None = None) -> None:
        self.options = dict(steps=steps, out=out, threshold=threshold, zero_init=zero_init, loop=loop,
                            seq_len=seq_len, run_id=run_id)
        self.watch = None

    @property
    def result(self):
        return self.watch.result if self.watch is not None else None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from zeroest.watch import Watch

        if self.watch is not None:
            return
        engine = find_engine(model) if model is not None else None
        if engine is None:
            log.warning("zeroest: no DeepSpeed engine wraps the Trainer's model (pass deepspeed= to "
                        "TrainingArguments); nothing is watched")
            return
        self.watch = Watch(engine, **self.options)
        self.watch.start()

    def on_train_end(self, args, state, control, **kwargs):
        if self.watch is not None:
            self.watch.stop()

"""The training loop of a validation run, run as the setup's ``loop`` says (``vocab.Loop``), so that measured
rows keep alive what the estimate assumes (``core.timeline.loop_outputs_bytes``).

* trainer: ``loss = engine(...).loss``: the output object dies as the forward returns, as in transformers'
  trainer.py ``compute_loss`` (``outputs["loss"]``); what the worker ran before ``loop`` was a key.
* custom: ``outputs = engine(...)``, reassigned every micro-step: it lives through backward and step and
  until the next micro-step's forward returns (across accumulation micro-steps and into the next step's first
  forward), as in the accelerate examples' loops.
* custom-del: the same, with ``del outputs`` after the micro-step's ``engine.step()``.

Phases: ``step<s>.forward<m>``, ``step<s>.backward<m>`` and ``step<s>.step`` (the ``engine.step()`` at the
accumulation boundary; the ones before it only count the micro-step and are measured inside ``backward<m>``).
"""

from __future__ import annotations

import time
from collections.abc import Callable


def train_steps(spec: dict, engine, meter, result: dict, write: Callable[[], None]) -> list[float]:
    """Train ``spec["steps"]`` steps of ``grad_accum`` micro-steps, measuring each phase with ``meter``; the
    step times in seconds. ``write()`` saves ``result`` after every phase (the worker's ``rank<R>.json``)."""
    import torch
    from zeroest.estimator.core.vocab import MEASURED_BEFORE_KEY, Loop

    setup = spec["setup"]
    micro, seq, accum = setup["micro_batch"], setup["seq_len"], setup["grad_accum"]
    loop = Loop(setup.get("loop") or MEASURED_BEFORE_KEY["loop"])
    vocab = engine.module.config.vocab_size
    device = engine.device
    generator = torch.Generator(device="cpu").manual_seed(1234)
    step_times: list[float] = []
    for step in range(spec["steps"]):
        start = time.perf_counter()
        for micro_step in range(accum):
            ids = torch.randint(0, vocab, (micro, seq), generator=generator).to(device)
            with meter.phase(f"step{step}.forward{micro_step}"):
                if loop == Loop.TRAINER:
                    loss = engine(input_ids=ids, labels=ids).loss
                else:
                    outputs = engine(input_ids=ids, labels=ids)  # the previous outputs dies only now
                    loss = outputs.loss
            write()
            last = micro_step == accum - 1
            with meter.phase(f"step{step}.backward{micro_step}"):
                engine.backward(loss)
                if not last:
                    engine.step()  # only counts the micro-step; DeepSpeed steps at the boundary
            write()
            del loss
            if loop == Loop.CUSTOM_DEL and not last:
                del outputs
        with meter.phase(f"step{step}.step"):
            engine.step()
        if loop == Loop.CUSTOM_DEL:
            del outputs
        step_times.append(time.perf_counter() - start)
        result["measured"]["step_times_s"] = list(step_times)
        write()
    return step_times

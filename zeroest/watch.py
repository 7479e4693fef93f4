"""``zeroest.watch(engine)``: the user's own DeepSpeed job as a validation run.

::

    engine, *_ = deepspeed.initialize(model=model, config=ds_config, model_parameters=model.parameters())
    with zeroest.watch(engine, out="runs/watch.jsonl") as w:
        for batch in loader:
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
    w.result.checks  # per phase: measured and predicted peak bytes

For its first ``steps`` optimizer steps (default 3) the watch wraps ``engine.forward``, ``engine.backward`` and
``engine.step`` (instance attributes, removed again when it stops), and measures each call as validate's worker
measures its phases (``validate.measure.Meter``; on the CPU ``CpuMeter``, live tensor bytes), named as the worker
names them: ``step<s>.forward<m>``, ``step<s>.backward<m>`` and ``step<s>.step``; an ``engine.step()`` before the
accumulation boundary only counts micro-steps and is measured into ``backward<m>``, as there. It reads the setup
off the engine and the first batch (``integrations.engine``), estimates it, logs a warning on each rank for every
phase whose measured peak differs from the prediction by more than ``threshold`` (or exceeds it by more than 1%),
and, given ``out``, appends this rank's row to that runs.jsonl (``integrations.compare``), so ``zeroest report
OUT`` takes it. The loop kind (``trainer``, ``custom``, ``custom-del``) is seen through a weak reference to the
forward's output: dead at backward, alive at backward only, or alive at the next forward.

Side effects while it watches: CUDA peak statistics are reset at each phase, and each phase ends with a device
synchronize; ``torch.cuda.reset_peak_memory_stats`` stays routed through the meter for the rest of the process
(a reset by the job or DeepSpeed first folds the current peaks into the phase measured, then resets as asked);
on the CPU every tensor op runs under a ``TorchDispatchMode``. It never stops the job: a failure of its own
bookkeeping is logged, not raised.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import time
import types
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("zeroest.watch")

WRAPPED = ("forward", "backward", "step")
_MISSING = object()
_ORDER = {"trainer": 0, "custom-del": 1, "custom": 2}


@dataclass(frozen=True, kw_only=True)
class WatchResult:
    """What a watch found on this rank."""

    setup: object
    """The live job's ``TrainingSetup``."""
    prediction: dict
    """``Estimate.to_dict()`` of that setup."""
    checks: tuple
    """``compare.PhaseCheck`` per phase (forward, backward, step)."""
    warnings: tuple[str, ...]
    assumptions: tuple[str, ...]
    loop: str
    """The loop seen (``trainer``, ``custom``, ``custom-del``); ``custom`` when it could not be told."""
    rows_written: int
    row: dict
    """This rank's runs.jsonl row (written only with ``out``)."""


class _LoopSeen:
    """What the loop keeps of the forward's output, seen through a weak reference to it."""

    def __init__(self) -> None:
        self.ref = None
        self.seen: str | None = None

    def _note(self, loop: str) -> None:
        if self.seen is None or _ORDER[loop] > _ORDER[self.seen]:
            self.seen = loop

    def after_forward(self, out) -> None:
        try:
            self.ref = weakref.ref(out)
        except TypeError:  # a plain tuple: cannot be told
            self.ref = None

    def before_backward(self) -> None:
        if self.ref is not None and self.ref() is None:
            self._note("trainer")
            self.ref = None

    def before_forward(self) -> None:
        if self.ref is not None:
            self._note("custom" if self.ref() is not None else "custom-del")
        self.ref = None

    def verdict(self) -> tuple[str, str | None]:
        """(loop, note): the largest case seen; ``custom`` (the conservative one) with a note when none was."""
        if self.seen is None:
            return "custom", "the loop kind could not be told from the watched steps: assumed custom (the output " \
                             "lives until the next forward); pass loop= to say"
        return self.seen, None


def _cpu_tensors(engine) -> list:
    """Every tensor alive on the CPU (gc-tracked tensors, and the parameters' gradients, whose Python objects
    torch makes on demand), to adopt into ``LiveBytes`` so that the live total is the whole process."""
    import torch

    with warnings.catch_warnings():  # isinstance on some module objects warns of deprecated attributes
        warnings.simplefilter("ignore")
        found = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    found += [p.grad for p in engine.module.parameters() if p.grad is not None]
    return [t for t in found if t.device.type == "cpu"]


class Watch:
    """Measures the first ``steps`` optimizer steps of ``engine`` and compares them with the estimate.

    ``out``: a runs.jsonl to append this rank's row to (None: only warn). ``threshold``: the relative divergence
    warned about. ``zero_init``, ``loop``, ``seq_len``: what the watch cannot see or should not guess (None:
    detected, or the larger case, named in ``assumptions``). ``run_id``: what makes this job's ``run_key``
    (default: the launcher's job identity).
    """

    def __init__(self, engine, *, steps: int = 3, out: str | Path | None = None, threshold: float = 0.05,
                 zero_init: bool | None = None, loop: str | None = None, seq_len: int | None = None,
                 run_id: str | None = None) -> None:
        from zeroest.integrations.engine import LOOPS

        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"watch steps must be a whole number >= 1, got {steps!r}")
        if not 0 < float(threshold) < 1:
            raise ValueError(f"watch threshold is a fraction in (0, 1), e.g. 0.05 for 5%; got {threshold!r}")
        if loop is not None and loop not in LOOPS:
            raise ValueError(f"watch loop {loop!r} is not one of {', '.join(LOOPS)}")
        for name in WRAPPED:
            if not callable(getattr(engine, name, None)):
                raise ValueError(f"watch needs a DeepSpeed engine (deepspeed.initialize's first value); "
                                 f"{type(engine).__name__} has no {name}()")
        self.engine, self.steps, self.threshold = engine, steps, float(threshold)
        self.out = Path(out).expanduser() if out is not None else None
        self.zero_init, self.loop, self.seq_len, self.run_id = zero_init, loop, seq_len, run_id
        self.result: WatchResult | None = None
        self._saved: dict[str, object] = {}
        self._meter = None
        self._loop = _LoopSeen()
        self._batch: tuple[int, int] | None = None
        self._step, self._micro = 0, 0
        self._step_start: float | None = None
        self._step_times: list[float] = []
        self._started = self._stopped = False
        self._oom: str | None = None
        self._start_bytes: int | None = None

    # -- context manager --------------------------------------------------------------------------------------
    def __enter__(self) -> Watch:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.stop(exc)
        return False

    def start(self) -> None:
        """Make the meter and wrap the engine's methods."""
        import torch

        from zeroest.validate.measure import CpuMeter, Meter

        if self._started:
            return
        self._started, self._t0 = True, time.perf_counter()
        if self.engine.device.type == "cuda":
            self._meter = Meter(torch.device("cuda", torch.cuda.current_device()))
            self._start_bytes = int(torch.cuda.memory_allocated(self._meter.device))
        else:
            self._meter = CpuMeter()
            self._meter.live.adopt(_cpu_tensors(self.engine))
            self._start_bytes = int(self._meter.live.live_bytes)
            self._meter.live.__enter__()
        for name in WRAPPED:
            self._saved[name] = self.engine.__dict__.get(name, _MISSING)
            object.__setattr__(self.engine, name, getattr(self, f"_wrapped_{name}"))

    def stop(self, exc: BaseException | None = None) -> WatchResult | None:
        """Unwrap, compare and write (once); an out-of-memory ``exc`` makes an ``oom`` row."""
        if not self._started or self._stopped:
            return self.result
        self._stopped = True
        self._unwrap()
        if exc is not None:
            from zeroest.validate.measure import is_oom

            if not is_oom(exc):
                return None
            self._oom = self._meter.current or "unknown"
        try:
            self.result = self._finish()
        except Exception as err:  # noqa: BLE001 - the watch must never end the user's job
            log.warning("zeroest.watch could not compare this job: %s: %s", type(err).__name__, err)
        return self.result

    def _unwrap(self) -> None:
        for name, saved in self._saved.items():
            self.engine.__dict__.pop(name, None)
            if saved is not _MISSING:
                object.__setattr__(self.engine, name, saved)
        if self._meter is not None and hasattr(self._meter, "live"):
            with contextlib.suppress(Exception):
                self._meter.live.__exit__(None, None, None)

    # -- the wrapped methods ----------------------------------------------------------------------------------
    def _original(self, name: str):
        return getattr(type(self.engine), name).__get__(self.engine) if self._saved[name] is _MISSING \
            else self._saved[name]

    def _note_batch(self, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        shape = tuple(getattr(ids, "shape", ()))
        if self._batch is None and len(shape) == 2:
            self._batch = (int(shape[0]), int(self.seq_len or shape[1]))

    def _wrapped_forward(self, *args, **kwargs):
        self._note_batch(args, kwargs)
        self._loop.before_forward()
        if self._step_start is None:
            self._step_start = time.perf_counter()
        with self._meter.phase(f"step{self._step}.forward{self._micro}"):
            out = self._original("forward")(*args, **kwargs)
        self._loop.after_forward(out)
        return out

    def _wrapped_backward(self, *args, **kwargs):
        self._loop.before_backward()
        with self._meter.phase(f"step{self._step}.backward{self._micro}"):
            out = self._original("backward")(*args, **kwargs)
        self._micro += 1
        return out

    def _wrapped_step(self, *args, **kwargs):
        before = int(getattr(self.engine, "global_steps", 0))
        name = f"step{self._step}.step"
        with self._meter.phase(name):
            out = self._original("step")(*args, **kwargs)
        if int(getattr(self.engine, "global_steps", 0)) == before:  # not the boundary: part of backward<m>
            self._merge(self._meter.phases.pop(name), f"step{self._step}.backward{max(self._micro - 1, 0)}")
            return out
        self._step_times.append(time.perf_counter() - (self._step_start or time.perf_counter()))
        self._step, self._micro, self._step_start = self._step + 1, 0, None
        if self._step >= self.steps:
            self.stop()
        return out

    def _merge(self, record: dict, into: str) -> None:
        target = self._meter.phases.setdefault(into, dict(record))
        for key in ("peak_allocated_bytes", "peak_reserved_bytes", "nvml_bytes", "rss_bytes"):
            values = [v for v in (target.get(key), record.get(key)) if v is not None]
            target[key] = max(values) if values else None
        for key in ("allocated_bytes", "reserved_bytes", "num_alloc_retries", "num_ooms"):
            target[key] = record.get(key)
        target["time_s"] = (target.get("time_s") or 0) + (record.get("time_s") or 0)

    # -- the comparison ---------------------------------------------------------------------------------------
    def _finish(self) -> WatchResult:
        from zeroest.integrations import compare
        from zeroest.integrations import engine as live
        from zeroest.report.join import measured_phase_peaks
        from zeroest.validate.worker import host_info, versions

        if self._batch is None:
            raise ValueError("no forward with a 2-d input_ids was watched: pass seq_len= and call engine(...) "
                             "with input_ids inside the watch")
        loop, note = (self.loop, None) if self.loop else self._loop.verdict()
        config = live.model_config(self.engine)
        label = live.model_label(config)
        model = compare.write_model(config, self.out, label) if self.out else f"models/{label}.json"
        setup, notes = live.live_setup(self.engine, micro_batch=self._batch[0], seq_len=self._batch[1],
                                       model_name=model, zero_init=self.zero_init, loop=loop)
        notes += [note] if note else []
        prediction = self._predict(setup)
        from zeroest.estimator.configs.flat import setup_to_dict

        flat = setup_to_dict(setup)
        predicted = {name: int(p["peak_bytes"]) for name, p in prediction["phases"].items()}
        checks = compare.check_phases(measured_phase_peaks(self._meter.phases), predicted)
        rank, world = live.rank(), setup.world_size
        warnings = compare.warn(checks, self.threshold, rank, f"{label} stage {flat['stage']}, N_d {world}")
        tokens = setup.workload.micro_batch * setup.workload.seq_len * setup.workload.grad_accum * world
        measured = compare.measured_block(dict(self._meter.phases), self._step_times, tokens, oom=self._oom,
                                          extra={"watched_steps": self._step, "loop_seen": loop,
                                                 "start_allocated_bytes": self._start_bytes,
                                                 "assumptions": notes})
        result = {"complete": self._oom is None, "error": f"out of memory in {self._oom}" if self._oom else None,
                  "measured": measured, "versions": versions(), "host": host_info(),
                  "cpu" if self._meter.device.type == "cpu" else "gpu": self._meter.device_info()}
        key = compare.run_key(flat, self.run_id, world)
        rows = compare.rows_for(key=key, flat_setup=flat, rank=rank, world_size=world, result=result,
                                prediction=prediction, prediction_error=None,
                                wall_s=time.perf_counter() - self._t0)
        written = compare.append(self.out, rows) if self.out else 0
        return WatchResult(setup=setup, prediction=prediction, checks=tuple(checks), warnings=tuple(warnings),
                           assumptions=tuple(notes), loop=loop, rows_written=written, row=rows[0])

    def _predict(self, setup) -> dict:
        """The estimate as ``zeroest predict`` would make it here: the GPU's calibration when one was fitted."""
        from zeroest.estimator.core.estimate import estimate

        if self._meter.device.type == "cpu":
            return estimate(setup, device="cpu").to_dict()
        import deepspeed
        import torch

        from zeroest.estimator.catalog.calibration import find_calibration

        overheads = find_calibration(self._meter.device_info()["name"], torch.__version__, deepspeed.__version__)
        return estimate(setup, overheads).to_dict()


def watch(engine, *, steps: int = 3, out: str | Path | None = None, threshold: float = 0.05,
          zero_init: bool | None = None, loop: str | None = None, seq_len: int | None = None,
          run_id: str | None = None) -> Watch:
    """A ``Watch`` of ``engine``'s first ``steps`` optimizer steps (see the module docstring); use it as a context
    manager, or call ``start()`` and ``stop()``."""
    return Watch(engine, steps=steps, out=out, threshold=threshold, zero_init=zero_init, loop=loop,
                 seq_len=seq_len, run_id=run_id)


class _CallableModule(types.ModuleType):
    """``import zeroest.watch`` binds the package's ``watch`` to this module; calling it is calling ``watch``."""

    def __call__(self, engine, **kwargs) -> Watch:
        return watch(engine, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

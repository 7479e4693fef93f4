"""Running one planned run as a fresh process tree, and packing several onto one GPU.

A ``Job`` is one run's process group (``start_new_session``), so a hung or finished run is ended with
everything it started (launcher and ranks) by that group's id alone. ``Slots`` decides which GPUs a run may
take now: a run of one rank may share a GPU with others when their predicted device memory
(``Estimate.device_bytes``) fits together; a run of several ranks, or one without a prediction, takes its
GPUs alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from zeroest.estimator.units import GiB

PACKING_MARGIN = 1.15
"""Predicted device bytes are scaled by this when packing runs onto one GPU (the estimate may be low)."""
PACKING_SLACK_BYTES = 1 * GiB
"""Added per run when packing: CUDA context and NCCL buffers the prediction may not hold."""
GPU_USABLE_FRACTION = 0.92
"""Share of a GPU's memory that packed runs may claim together."""


@dataclass(frozen=True, kw_only=True)
class Run:
    """One planned run: a setup, how it runs, and what was predicted for it."""

    key: str
    """Resume key: hash of setup + simulated + launcher + device."""
    setup: dict
    """Canonical flat setup (``setup_to_dict``)."""
    simulated: bool
    """Rank 0 of a ``world_size``-rank job on the fake process group."""
    launcher: str
    """torchrun, accelerate or deepspeed (simulated runs start the worker directly)."""
    spec: dict
    """What the worker reads (model config, ds_config, steps, ...)."""
    prediction: dict | None
    """``Estimate.to_dict()``, None when the estimator failed."""
    prediction_error: str | None
    """Why there is no prediction."""
    where: str = ""
    """The grid entry it came from."""
    fallback_need_bytes: int | None = None
    """Packing size when there is no prediction (``rough_need_bytes``)."""

    @property
    def nproc(self) -> int:
        """Processes (ranks) this run starts on this node."""
        return 1 if self.simulated else int(self.setup["gpus_per_node"])

    @property
    def need_bytes(self) -> int | None:
        """GPU memory to set aside when packing; None: take the GPU alone."""
        if not self.prediction or not self.prediction.get("device_bytes"):
            return self.fallback_need_bytes
        need = int(self.prediction["device_bytes"] * PACKING_MARGIN) + PACKING_SLACK_BYTES
        card = self.setup.get("gpu_memory_bytes")  # an emulated card caps the run (validate.emulate)
        return min(need, int(card) + PACKING_SLACK_BYTES) if card else need


def rough_need_bytes(n_params: int, setup: dict, vocab_size: int) -> int:
    """A deliberately high packing size for a run the estimator could not predict.

    16 bytes per parameter (16-bit weights and gradients, fp32 master and two Adam states: the ZeRO paper's
    2 + 2 + 12, unsharded), 4 bytes per parameter with the optimizer offloaded, plus the fp32 logits of one
    micro-batch six times over (logits, upcast, softmax, their gradients), plus 5 GiB for everything else.
    """
    per_param = 4 if setup.get("offload_optimizer", "none") != "none" else 16
    logits = int(setup["micro_batch"]) * int(setup["seq_len"]) * vocab_size * 4 * 6
    return n_params * per_param + logits + 5 * GiB


@dataclass
class Job:
    """A run in flight."""

    run: Run
    proc: subprocess.Popen
    run_dir: Path
    gpus: list[int]
    alone: bool
    """Nothing else may join its GPUs."""
    started: float = field(default_factory=time.monotonic)
    shared: bool = False
    """Another run was on its GPUs (or on the CPU) at some time while it ran."""
    first_rank: int = 0
    """Global rank of this node's first rank (``node_rank * nproc``)."""

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def stop(self, grace_s: float = 10.0) -> None:
        """End the run's whole process group: SIGTERM, then SIGKILL after ``grace_s``."""
        if self.proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def rank_results(self) -> list[dict | None]:
        """Each of this node's ranks' ``rank<R>.json`` (None where a rank left none)."""
        out: list[dict | None] = []
        for rank in range(self.first_rank, self.first_rank + self.run.nproc):
            path = self.run_dir / f"rank{rank}.json"
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError):
                out.append(None)
        return out

    def log_tail(self, chars: int = 1500) -> str:
        """The end of the run's combined output."""
        try:
            return (self.run_dir / "output.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class Slots:
    """Which GPUs are free for which run. ``capacity_bytes[i]`` is GPU i's memory; empty on the CPU."""

    capacity_bytes: list[int]
    jobs: int
    cpu: bool = False
    running: list[Job] = field(default_factory=list)

    def place(self, run: Run) -> tuple[list[int], bool] | None:
        """(GPUs, alone) for ``run`` now, or None if it must wait."""
        if len(self.running) >= self.jobs:
            return None
        if self.cpu:
            return [], self.jobs == 1
        busy = {gpu for job in self.running for gpu in job.gpus}
        need = run.need_bytes
        if run.nproc > 1 or need is None or self.jobs == 1:
            idle = [i for i in range(len(self.capacity_bytes)) if i not in busy]
            return (idle[: run.nproc], True) if len(idle) >= run.nproc else None
        best: tuple[int, int] | None = None
        for gpu, capacity in enumerate(self.capacity_bytes):
            on_gpu = [job for job in self.running if gpu in job.gpus]
            if any(job.alone for job in on_gpu):
                continue
            free = int(capacity * GPU_USABLE_FRACTION) - sum(job.run.need_bytes or 0 for job in on_gpu)
            if free >= need and (best is None or free > best[1]):
                best = (gpu, free)
        return ([best[0]], False) if best else None

    def add(self, job: Job) -> None:
        """Track a started job; mark it and its neighbours as sharing."""
        for other in self.running:
            if self.cpu or set(other.gpus) & set(job.gpus):
                other.shared = job.shared = True
        self.running.append(job)

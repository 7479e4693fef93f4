"""Join measured ranks with estimates: rebuild each row's setup, predict it again, pair every quantity and
phase.

A ``Record`` is one measured rank whose setup the current estimator could rebuild. Rows it cannot rebuild
(unknown model, a setup this version rejects, paper mode) are returned as ``Skipped`` with the reason, never
dropped silently.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from zeroest.estimator.catalog.calibration import calibration_name, find_calibration, short_version
from zeroest.estimator.core.overheads import Overheads
from zeroest.estimator.core.setup import TrainingSetup
from zeroest.report.errors import relative_error
from zeroest.report.fit import BASIS_SCALES, NEUTRAL, QUANTITIES, Sample, facts_from_estimate, terms_from_estimates
from zeroest.report.load import RunRow, Skipped, is_oom, read_model, resolve_model

log = logging.getLogger(__name__)

PHASES: tuple[str, ...] = ("init", "forward", "backward", "step")
_STEP_PHASE = re.compile(r"^step\d+\.(forward|backward|step)\d*$")


def measured_phase_peaks(phases: dict) -> dict[str, int]:
    """Peak allocated per predicted phase: ``init``, and the largest over steps of ``stepK.forwardM`` and so
    on."""
    out: dict[str, int] = {}
    for name, record in (phases or {}).items():
        match = _STEP_PHASE.match(name)
        kind = "init" if name == "init" else match.group(1) if match else None
        peak = (record or {}).get("peak_allocated_bytes")
        if kind and peak:
            out[kind] = max(out.get(kind, 0), int(peak))
    return out


def _measured_peak_phase(phases: dict) -> str | None:
    """The measured phase with the largest peak allocated, ``build`` left out as validate's overall peak does
    (validate/measure.py ``summarize``: building the model is not part of the training job)."""
    peaks = [((rec or {}).get("peak_allocated_bytes") or 0, name) for name, rec in (phases or {}).items()
             if name != "build"]
    best = max(peaks, default=(0, None))
    return best[1] if best[0] else None


def _device_bytes(row: dict) -> tuple[int | None, str | None]:
    """Measured device bytes, or (None, why) when NVML read the whole device of a shared GPU."""
    measured = row["measured"]
    value = measured.get("device_bytes")
    if not value:
        return None, None
    scopes = {(rec or {}).get("nvml_scope") for rec in (measured.get("phases") or {}).values()} - {None}
    if "device" in scopes and "process" not in scopes and not row.get("exclusive"):
        return None, "NVML saw only the whole device's memory on a shared GPU"
    return int(value), None


@dataclass(frozen=True, kw_only=True)
class Environment:
    """Where a row was measured: the calibration group."""

    gpu_name: str | None
    """``gpu.name`` of the row; None for CPU runs."""
    torch_version: str | None
    ds_version: str | None

    @property
    def group(self) -> str:
        """The calibration file stem, or ``cpu-torch<ver>-ds<ver>`` for CPU runs."""
        if self.gpu_name:
            return calibration_name(self.gpu_name, self.torch_version, self.ds_version).removesuffix(".json")
        return f"cpu-torch{short_version(self.torch_version)}-ds{short_version(self.ds_version)}"


def environment(row: dict) -> Environment:
    versions = row.get("versions") or {}
    gpu = row.get("gpu") if isinstance(row.get("gpu"), dict) else None
    return Environment(gpu_name=gpu.get("name") if gpu else None, torch_version=versions.get("torch"),
                       ds_version=versions.get("deepspeed"))


@dataclass(frozen=True, kw_only=True)
class Prediction:
    """Predicted bytes of every compared quantity and phase under one set of overheads."""

    quantities: dict[str, int]
    """peak_allocated, peak_reserved, device."""
    phases: dict[str, int]
    """Peak allocated per phase."""
    components: dict[str, int]
    peak_phase: str
    overheads_source: str
    host: dict[str, int] = field(default_factory=dict)
    """Host RAM of one rank by term (``Estimate.host.components()``); empty for predictions stored before it."""


def prediction_from_dict(est: dict) -> Prediction:
    """A ``Prediction`` from ``Estimate.to_dict()`` (the current one, or the one stored at run time)."""
    return Prediction(
        quantities={"peak_allocated": int(est["peak_allocated_bytes"]),
                    "peak_reserved": int(est["peak_reserved_bytes"]), "device": int(est["device_bytes"])},
        phases={name: int(p["peak_bytes"]) for name, p in (est.get("phases") or {}).items()},
        components=dict(est.get("components") or {}), peak_phase=str(est.get("peak_phase")),
        overheads_source=str(est.get("overheads_source")),
        host={k: int(v) for k, v in (est.get("host_components") or {}).items()},
    )


@dataclass(frozen=True, kw_only=True)
class Record:
    """One measured rank joined with what the current estimator predicts for its setup."""

    row: RunRow
    setup: TrainingSetup
    env: Environment
    measured: dict[str, int | None]
    """peak_allocated, peak_reserved, device (bytes; None where not measured)."""
    measured_phases: dict[str, int]
    measured_peak_phase: str | None
    notes: tuple[str, ...]
    sample: Sample
    """The fit's view of this rank (candidate phase points of ``NEUTRAL`` estimates, measured bytes)."""
    current: Prediction
    """With the overheads predict would use here: the group's calibration file, else the defaults."""

    @property
    def key(self) -> str:
        return self.row.where

    @property
    def simulated(self) -> bool:
        return bool(self.row.data.get("simulated"))

    @property
    def cpu(self) -> bool:
        """Measured on the CPU (``validate --cpu``): no GPU in the row."""
        return not self.row.data.get("gpu")

    @property
    def oom(self) -> str | None:
        return str(self.row.data["measured"].get("oom") or "unknown") if is_oom(self.row) else None

    @property
    def model(self) -> str:
        return str(self.row.data["setup"].get("model", "?")).rsplit("/", 1)[-1].removesuffix(".json")

    @cached_property
    def stored(self) -> Prediction | None:
        """The prediction written at run time, if any."""
        est = self.row.data.get("prediction")
        try:
            return prediction_from_dict(est) if isinstance(est, dict) else None
        except (KeyError, TypeError, ValueError):
            return None

    def errors(self, prediction: Prediction) -> dict[str, float | None]:
        """Signed relative error of each quantity, then ``phase:<name>`` for each measured phase."""
        out: dict[str, float | None] = {}
        for q in QUANTITIES:
            m = self.measured.get(q)
            out[q] = relative_error(prediction.quantities[q], m) if m else None
        for name, m in self.measured_phases.items():
            if name in prediction.phases:
                out[f"phase:{name}"] = relative_error(prediction.phases[name], m)
        return out


def overheads_for(env: Environment, simulated: bool, base: Overheads | None = None) -> Overheads:
    """``base``, else the group's calibration file, else the defaults; no NCCL buffers on a fake process
    group."""
    oh = base
    if oh is None and env.gpu_name:
        oh = find_calibration(env.gpu_name, env.torch_version, env.ds_version)
    return oh or Overheads()


def predict(setup: TrainingSetup, overheads: Overheads, *, simulated: bool = False, cpu: bool = False) -> Prediction:
    """The current estimator's prediction for a measured row: a fake process group has no NCCL memory, a CPU
    row takes torch's CPU optimizer path and no CUDA overheads (``estimate``'s ``simulated`` and ``device``)."""
    from zeroest.estimator.core.estimate import estimate

    return prediction_from_dict(
        estimate(setup, overheads, device="cpu" if cpu else "cuda", simulated=simulated).to_dict())


def join_row(row: RunRow, calibration: Overheads | None = None) -> Record:
    """The record of one row; ValueError (or FileNotFoundError) when its setup cannot be rebuilt.
    ``calibration``: overheads for ``current`` in place of the group's file (a calibration held against rows
    it was not fitted on)."""
    from zeroest.estimator.configs.flat import setup_from_row
    from zeroest.estimator.core.estimate import estimate

    data = dict(row.data["setup"])
    if data.get("mode", "deepspeed") != "deepspeed":
        raise ValueError(f"mode {data.get('mode')!r}: only DeepSpeed-faithful runs are compared")
    model = read_model(resolve_model(str(data.get("model", "")), row.source))[0]
    setup = setup_from_row(data, model=model, where=row.where)
    env = environment(row.data)
    simulated = bool(row.data.get("simulated"))
    cpu_row = not row.data.get("gpu")
    device, why = _device_bytes(row.data)
    m = row.data["measured"]
    measured = {"peak_allocated": m.get("peak_allocated_bytes") or None,
                "peak_reserved": m.get("peak_reserved_bytes") or None, "device": device}
    dicts = {s: estimate(setup, replace(NEUTRAL, activation_scale=s), device="cpu" if cpu_row else "cuda",
                         simulated=simulated).to_dict() for s in BASIS_SCALES}
    basis = {s: d["phases"] for s, d in dicts.items()}
    facts = facts_from_estimate(dicts[1.0])
    sample = Sample(key=row.where, group=Path(str(data.get("model"))).name.removesuffix(".json"),
                    phases=terms_from_estimates(basis),
                    peers=0 if simulated else setup.world_size - 1, real_comm=not simulated and not cpu_row,
                    measured=dict(measured) if not is_oom(row) else {},
                    facts=facts)
    return Record(
        row=row, setup=setup, env=env, measured=measured,
        measured_phases=measured_phase_peaks(m.get("phases") or {}),
        measured_peak_phase=_measured_peak_phase(m.get("phases") or {}),
        notes=(why,) if why else (), sample=sample,
        current=predict(setup, overheads_for(env, simulated, calibration), simulated=simulated, cpu=cpu_row),
    )


def join_rows(rows: list[RunRow], calibration: Overheads | None = None) -> tuple[list[Record], list[Skipped]]:
    """Records of every row the estimator can rebuild; the others as ``Skipped`` with the reason."""
    records: list[Record] = []
    skipped: list[Skipped] = []
    for row in rows:
        try:
            records.append(join_row(row, calibration))
        except ImportError:
            raise
        except Exception as exc:  # noqa: BLE001 - one row the estimator chokes on must not end the report
            if isinstance(exc, KeyError):
                reason = f"missing key {exc}"
            elif isinstance(exc, (ValueError, FileNotFoundError)):
                reason = str(exc)
            else:
                reason = f"{type(exc).__name__}: {exc}"
            why = f"the estimator cannot rebuild its setup: {reason}"
            skipped.append(Skipped(where=row.where, reason=why))
    return records, skipped

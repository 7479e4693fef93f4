"""``zeroest validate``: run a grid of real DeepSpeed trainings, each in a fresh process, and compare with
predictions.

``plan`` turns grid entries into ``Run``s (setup checked, prediction made, worker spec written); ``execute``
runs them through the chosen launcher, ``--jobs`` at a time where predicted memory fits, kills a run that
outlives ``--timeout``, appends each finished run's rows to OUT/runs.jsonl at once, and skips runs already
there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from zeroest.estimator.configs.accelerate_write import accelerate_yaml
from zeroest.estimator.configs.ds_write import ds_config
from zeroest.estimator.configs.flat import setup_from_dict, setup_to_dict
from zeroest.validate.adapters import check_measurable
from zeroest.validate.grid import GridEntry
from zeroest.validate.jobs import Job, Run, Slots, rough_need_bytes
from zeroest.validate.launch import LaunchOptions, child_env, deepspeed_env_file, free_port, launch_command

from zeroest.report.runs import RUNS_FILE, append_rows, check_version, done_keys, drop_runs, make_rows, read_rows

log = logging.getLogger(__name__)

_PROBE = (
    "import json, torch\n"
    "print(json.dumps([{'name': torch.cuda.get_device_name(i), 'memory_bytes': "
    "torch.cuda.get_device_properties(i).total_memory, "
    "'capability': list(torch.cuda.get_device_capability(i))} "
    "for i in range(torch.cuda.device_count())]))"
)


@dataclass(frozen=True, kw_only=True)
class ValidateOptions:
    """Everything ``validate`` needs besides the grid."""

    out: Path
    """Results directory: runs.jsonl, summary.md, work/<run>/ (spec, ds_config, logs, rank files)."""
    launch: LaunchOptions = field(default_factory=LaunchOptions)
    """Launcher and multi-node flags."""
    cpu: bool = False
    """gloo ranks on the CPU; memory from ``validate.memtrack.LiveBytes``."""
    gpus: int | None = None
    """Ranks per node of real runs whose entry names no world size (None: all visible GPUs; 2 on the CPU)."""
    jobs: int = 1
    """Runs at once (one GPU shared where predicted memory fits)."""
    timeout_s: float = 600.0
    """A run still going after this long is killed and recorded as a timeout."""
    steps: int = 3
    """Optimizer steps per run; the first is the warm-up."""
    redo: bool = False
    """Run again what runs.jsonl already holds (the old rows are dropped)."""
    pretrained: str | None = None
    """Local HF model directory to load weights from instead of random init."""
    work_dir: Path | None = None
    """Per-run folders (spec, ds_config, command, output.log, rank files); None: OUT/work."""

    @property
    def work(self) -> Path:
        """Where the per-run folders go."""
        return self.work_dir if self.work_dir is not None else self.out / "work"

    def __post_init__(self) -> None:
        if self.jobs < 1:
            raise ValueError(f"--jobs must be 1 or more, got {self.jobs}")
        if self.steps < 3:
            raise ValueError(f"--steps must be 3 or more (one warm-up, then steady state), got {self.steps}")
        if self.timeout_s <= 0:
            raise ValueError(f"--timeout must be positive, got {self.timeout_s}")


def zeroest_version() -> str:
    import zeroest

    return zeroest.__version__


def probe_gpus(env: dict[str, str]) -> list[dict]:
    """The visible CUDA GPUs, asked of a short-lived process so this one never holds a CUDA context."""
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=180)
        return json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else []
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError, OSError):
        return []


def run_key(setup: dict, simulated: bool, launcher: str, device: str) -> str:
    """The resume key of a run: the same setup, mode, launcher and device is the same run."""
    blob = json.dumps({"setup": setup, "simulated": simulated, "launcher": launcher, "device": device}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _model_config(name: str, inline: dict[str, dict], out: Path) -> tuple[str, dict]:
    """(model as the setup names it, HF config dict); inline grid models are written to OUT/models/<name>.json."""
    from zeroest.estimator.catalog import models as presets

    if name in inline:
        path = out / "models" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(inline[name], indent=1))
        return str(path), dict(inline[name])
    return name, presets.load_config(name)[1]


def predict(setup, *, device: str = "cuda", simulated: bool = False) -> tuple[dict | None, str | None]:
    """``Estimate.to_dict()`` of the setup as this run executes it (CPU or CUDA, fake or real process group), or
    (None, why) when the estimator fails."""
    try:
        from zeroest.estimator.core.estimate import estimate

        return estimate(setup, device="cpu" if device == "cpu" else "cuda", simulated=simulated).to_dict(), None
    except Exception as exc:  # noqa: BLE001 - a broken estimate must not stop the measurement
        log.warning("no prediction for %s: %s", setup.model.name, exc)
        return None, f"{type(exc).__name__}: {exc}"


def plan(entries: list[GridEntry], models: dict[str, dict], opts: ValidateOptions, visible_gpus: int) -> list[Run]:
    """Runs for the grid entries, in order, duplicates removed; ValueError naming the entry for a bad one."""
    device = "cpu" if opts.cpu else "cuda"
    ranks_default = opts.gpus or (2 if opts.cpu else visible_gpus)
    runs: dict[str, Run] = {}
    for entry in entries:
        data = dict(entry.setup)
        if not entry.simulate and not {"world_size", "gpus_per_node"} & data.keys():
            data["gpus_per_node"] = ranks_default
        if not entry.simulate:
            data.setdefault("nodes", opts.launch.nnodes)
        if "model" not in data:
            raise ValueError(f"{entry.where}: the entry names no model: add model: <preset> (or under defaults:)")
        data["model"], config = _model_config(str(data["model"]), models, opts.out)
        setup = setup_from_dict(data, where=entry.where)
        check_measurable(setup.adapters, entry.where)
        flat = setup_to_dict(setup)
        if not entry.simulate:
            _check_real(setup, opts, visible_gpus, entry.where)
        named = str(entry.setup.get("model", ""))  # an inline model by its name, not by where OUT/models/ is
        key = run_key({**flat, "model": named} if named in models else flat, entry.simulate, opts.launch.launcher,
                      device)
        if key in runs:
            continue
        prediction, why = predict(setup, device=device, simulated=entry.simulate)
        spec = {
            "setup": flat,
            "model_config": config,
            "simulated": entry.simulate,
            "device": device,
            "ds_config": ds_config(setup, nvme_path=str((opts.out / "nvme").resolve())),
            "steps": opts.steps,
            "pretrained": opts.pretrained,
            "run_key": key,
        }
        fallback = None
        if prediction is None:
            from zeroest.estimator.core.architecture import count_params

            fallback = rough_need_bytes(count_params(setup.model).total, flat, setup.model.vocab_size)
        runs[key] = Run(
            fallback_need_bytes=fallback,
            key=key,
            setup=flat,
            simulated=entry.simulate,
            launcher=opts.launch.launcher,
            spec=spec,
            prediction=prediction,
            prediction_error=why,
            where=entry.where,
        )
    return list(runs.values())


def _check_real(setup, opts: ValidateOptions, visible_gpus: int, where: str) -> None:
    if setup.parallel.nodes != opts.launch.nnodes:
        raise ValueError(
            f"{where}: the setup spans {setup.parallel.nodes} nodes but --nnodes is "
            f"{opts.launch.nnodes}: make them agree, or add simulate: true"
        )
    if not opts.cpu and setup.parallel.gpus_per_node > visible_gpus:
        raise ValueError(
            f"{where}: world size {setup.world_size} needs {setup.parallel.gpus_per_node} GPUs per node but "
            f"{visible_gpus} are visible: add simulate: true to the entry, or use --simulate-world-size"
        )


def write_accelerate_config(run: Run, opts: ValidateOptions, ds_path: Path, port: int) -> Path:
    """``accelerate.yaml`` next to the run's ds_config.json (``configs.accelerate_write.accelerate_yaml``: the
    same writer as ``zeroest plan``), with this node's launch fields; ``zero3_init_flag`` is the setup's
    zero_init at stage 3."""
    path = ds_path.parent / "accelerate.yaml"
    path.write_text(
        accelerate_yaml(
            setup_from_dict(run.setup, where=run.where),
            ds_config_file=str(ds_path.resolve()),
            machine_rank=opts.launch.node_rank,
            main_process=(opts.launch.master_addr, port),
            use_cpu=opts.cpu,
        )
    )
    return path


def _start(run: Run, opts: ValidateOptions, gpus: list[int], alone: bool, base_env: dict, capability) -> Job:
    run_dir = opts.work / run.key
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    spec = {**run.spec, "run_dir": str(run_dir.resolve())}
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=1))
    ds_path = run_dir / "ds_config.json"
    ds_path.write_text(json.dumps(run.spec["ds_config"], indent=1))
    port = opts.launch.master_port or free_port()
    accelerate_path = None
    if run.launcher == "accelerate" and not run.simulated:
        accelerate_path = write_accelerate_config(run, opts, ds_path, port)
    cmd = launch_command(
        opts.launch,
        nproc=run.nproc,
        spec_path=(run_dir / "spec.json").resolve(),
        simulated=run.simulated,
        port=port,
        accelerate_config=accelerate_path,
    )
    threads = (os.cpu_count() or 1) // (opts.jobs * run.nproc)  # ranks of concurrent runs share the cores
    env = child_env(
        base_env,
        cpu=opts.cpu,
        capability=capability,
        gpus=",".join(map(str, gpus)) if gpus else None,
        threads=threads if opts.jobs > 1 else None,
        expandable_segments=bool(run.spec["setup"].get("expandable_segments")) if not opts.cpu else None,
    )
    (run_dir / "command.txt").write_text(" ".join(cmd) + "\n")
    if run.launcher == "deepspeed" and opts.launch.hostfile:  # pdsh starts remote ranks with a bare environment
        (run_dir / ".deepspeed_env").write_text(deepspeed_env_file(env))
    with open(run_dir / "output.log", "wb") as handle:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=run_dir,  # not the caller's folder: a checkout there would shadow the zeroest on PYTHONPATH
        )
    first_rank = 0 if run.simulated else opts.launch.node_rank * run.nproc
    return Job(run=run, proc=proc, run_dir=run_dir, gpus=gpus, alone=alone, first_rank=first_rank)


def _finish(job: Job, failure: str | None) -> list[dict]:
    ranks = job.rank_results()
    code = job.proc.returncode
    if failure is None and code not in (0, None) and not any(r and r.get("measured", {}).get("oom") for r in ranks):
        failure = f"exit code {code}: {job.log_tail(600).strip()}"
    return make_rows(
        run_key=job.run.key,
        launcher=job.run.launcher,
        setup=job.run.setup,
        simulated=job.run.simulated,
        ranks=ranks,
        first_rank=job.first_rank,
        prediction=job.run.prediction,
        prediction_error=job.run.prediction_error,
        exclusive=not job.shared,
        wall_s=job.elapsed_s,
        failure=failure,
        version=zeroest_version(),
    )


def ops_to_build(runs: list[Run]) -> list[str]:
    """DeepSpeed op builders the runs need: Fused/CPU Adam or Lion for impl fused/cpu (Muon's aux Adam is Adam)."""
    wanted = {(r.setup["optimizer_impl"], "Lion" if r.setup.get("optimizer") == "lion" else "Adam") for r in runs}
    return [f"{'Fused' if i == 'fused' else 'CPU'}{k}Builder" for i, k in sorted(wanted) if i in ("fused", "cpu")]


def build_ops(names: list[str], opts: ValidateOptions, base_env: dict, capability) -> dict[str, bool]:
    """JIT-build each op once, all at once, in throwaway processes, before concurrent runs race on the build
    lock (each op has its own build folder and lock, so two builders never wait for each other)."""
    env = child_env(base_env, cpu=opts.cpu, capability=capability, gpus="0" if not opts.cpu else None)
    folder = opts.work
    folder.mkdir(parents=True, exist_ok=True)
    procs = {}
    for name in names:
        with open(folder / f"build_{name}.log", "wb") as handle:
            cmd = [sys.executable, "-m", "zeroest.validate.worker", "--build-ops", name]
            procs[name] = subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=folder)
    built = {}
    for name, proc in procs.items():
        try:
            built[name] = proc.wait(timeout=1800) == 0
        except subprocess.TimeoutExpired:
            proc.kill()
            built[name] = False
        if not built[name]:
            log.warning(
                "building %s failed (see %s); runs that need it will record the error",
                name,
                folder / f"build_{name}.log",
            )
    return built


def missing_packages() -> list[str]:
    """The packages a real run imports that are not installed (``importlib.util.find_spec``, nothing imported)."""
    from importlib.util import find_spec

    return [name for name in ("torch", "deepspeed", "transformers") if find_spec(name) is None]


def _crashed(rows: list[dict]) -> set[str]:
    """run_keys with a rank that crashed (the worker never reported): retried on resume, not counted done."""
    return {row["run_key"] for row in rows if row.get("status") == "crashed"}


def not_done(runs: list[Run], opts: ValidateOptions) -> list[Run]:
    """The runs OUT/runs.jsonl does not hold yet (a crashed run counts as not done); reads, writes nothing."""
    rows = [] if opts.redo else read_rows(opts.out / RUNS_FILE)
    crashed = _crashed(rows)
    done = done_keys(row for row in rows if row["run_key"] not in crashed)
    return [run for run in runs if run.key not in done]


def prepare_results(runs: list[Run], opts: ValidateOptions) -> list[Run]:
    """The runs still to do: check the version of OUT/runs.jsonl, drop redone and crashed runs, skip done ones."""
    opts.out.mkdir(parents=True, exist_ok=True)
    path = opts.out / RUNS_FILE
    rows = read_rows(path)
    check_version(rows, zeroest_version(), path)
    keys = {run.key for run in runs}
    retry = keys if opts.redo else keys & _crashed(rows)
    if retry:
        log.log(logging.INFO if opts.redo else logging.WARNING, "running %d run(s) again", len(retry))
        drop_runs(path, retry)
    return not_done(runs, opts)


def execute(
    runs: list[Run],
    opts: ValidateOptions,
    capacity_bytes: list[int],
    capability,
    on_done: Callable[[Run, list[dict]], None] = lambda run, rows: None,
) -> None:
    """Run ``runs``; append each one's rows to OUT/runs.jsonl as it ends and call ``on_done(run, rows)``."""
    base_env = dict(os.environ)
    slots = Slots(capacity_bytes=capacity_bytes, jobs=opts.jobs, cpu=opts.cpu)
    pending = list(runs)
    path = opts.out / RUNS_FILE
    try:  # SIGTERM (a killed validate) ends the runs it started, like Ctrl-C
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        previous = None
    try:
        while pending or slots.running:
            for run in list(pending):
                place = slots.place(run)
                if place is None and not slots.running and run is pending[0]:
                    place = (
                        list(range(min(run.nproc, len(capacity_bytes)))),
                        True,
                    )  # nothing fits: run it alone
                if place is not None:
                    pending.remove(run)
                    slots.add(_start(run, opts, place[0], place[1], base_env, capability))
            for job in list(slots.running):
                failure = None
                if job.proc.poll() is None:
                    if job.elapsed_s < opts.timeout_s:
                        continue
                    job.stop()
                    failure = f"timeout after {opts.timeout_s:.0f} s"
                slots.running.remove(job)
                rows = _finish(job, failure)
                append_rows(path, rows)
                on_done(job.run, rows)
            time.sleep(0.2)
    finally:
        for job in slots.running:
            job.stop(grace_s=3.0)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")

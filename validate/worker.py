"""One rank of one validation run: build the model, ``deepspeed.initialize``, train a few steps, measure
every phase.

Run per rank by torchrun / accelerate launch / the deepspeed launcher, or alone for a simulated rank 0 of an
N-rank job (fake process group) and on the CPU::

    python -m zeroest.validate.worker --spec OUT/work/<run>/spec.json

The spec (written by ``validate.runner``) holds the flat setup, the HF config dict, the ds_config, the mode
and the number of steps. After every phase the rank rewrites ``rank<R>.json`` next to the spec, so a run
killed by a timeout still leaves what it measured. Exit codes: 0 done, 3 out of memory (recorded in the
file), 1 any other error.

Phases: ``build`` (random-init HF model on the host), ``init`` (``deepspeed.initialize``), then for each step
``s`` and micro-step ``m``: ``step<s>.forward<m>``, ``step<s>.backward<m>``, and ``step<s>.step`` (the
``engine.step()`` at the accumulation boundary; DeepSpeed wants ``engine.step()`` after every micro-step, and
the ones before the boundary only count, so they are measured inside ``backward<m>``). Step 0 is the warm-up;
``steady`` summarises steps 1 on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path

log = logging.getLogger("zeroest.validate.worker")

EXIT_OK, EXIT_ERROR, EXIT_OOM = 0, 1, 3
_ATTN = {"sdpa": "sdpa", "flash": "flash_attention_2", "eager": "eager"}


def versions() -> dict:
    """Versions of everything that decides the measurement."""
    out: dict = {"python": platform.python_version()}
    for name in ("torch", "deepspeed", "transformers", "accelerate"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda
    except Exception:
        out["cuda"] = None
    out["driver"] = None
    with contextlib.suppress(Exception):
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        out["driver"] = driver.decode() if isinstance(driver, bytes) else driver
    return out


def host_info() -> dict:
    """Host name, cores and memory."""
    info: dict = {"hostname": socket.gethostname(), "cpu_count": os.cpu_count(), "memory_bytes": None}
    with contextlib.suppress(Exception):
        import psutil

        info["memory_bytes"] = int(psutil.virtual_memory().total)
    return info


class RankFile:
    """``rank<R>.json`` in the run's directory, rewritten atomically after every phase."""

    def __init__(self, run_dir: Path, rank: int) -> None:
        self.path = run_dir / f"rank{rank}.json"

    def write(self, result: dict) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, self.path)


def build_model(spec: dict):
    """The HF causal LM of the spec on the host: random init from its config dict, or local weights from
    ``pretrained``.

    On a GPU the random init runs there (HF's init of gpt2 in bf16 took 10-13 s on the H100 machine's CPUs),
    then the model moves to host memory and the CUDA cache is emptied, so
    ``deepspeed.initialize`` starts from a host model exactly as in a job that loads it on the host.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    setup = spec["setup"]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[setup["dtype"]]
    attn = _ATTN[setup.get("attn", "sdpa")]
    if spec.get("pretrained"):
        model = AutoModelForCausalLM.from_pretrained(
            spec["pretrained"], dtype=dtype, attn_implementation=attn
        )
    else:
        config_dict = dict(spec["model_config"])
        config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
        on_gpu = spec["device"] == "cuda"
        with torch.device("cuda") if on_gpu else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
        if on_gpu:
            model.to("cpu")
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    model.config.use_cache = False
    if setup.get("grad_ckpt"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _init_distributed(spec: dict, world_size: int) -> None:
    import deepspeed

    if spec["simulated"]:
        import torch.distributed as dist
        from torch.testing._internal.distributed.fake_pg import FakeStore
        from zeroest.validate.fakepg import init_fake_world

        # One rank alone on this host: LOCAL_SIZE=1 keeps DeepSpeed's CPU shared-memory allreduce
        # (deepspeed/comm/torch.py TorchBackend -> shm_interface.cpp initialize) from waiting for the other
        # world_size - 1 local ranks, which never come. init_fake_world sets LOCAL_SIZE=world_size, so the
        # fake group is made here first; init_fake_world then finds it and only checks it.
        os.environ["LOCAL_SIZE"] = "1"
        dist.init_process_group(backend="fake", rank=0, world_size=world_size, store=FakeStore())
        init_fake_world(0, world_size)
        deepspeed.init_distributed(dist_backend="gloo")
    else:
        deepspeed.init_distributed(dist_backend="gloo" if spec["device"] == "cpu" else "nccl")


def _steps(spec: dict, engine, meter, result: dict, rank_file: RankFile) -> list[float]:
    import torch

    setup = spec["setup"]
    micro, seq, accum = setup["micro_batch"], setup["seq_len"], setup["grad_accum"]
    vocab = engine.module.config.vocab_size
    device = engine.device
    generator = torch.Generator(device="cpu").manual_seed(1234)
    step_times: list[float] = []
    for step in range(spec["steps"]):
        start = time.perf_counter()
        for micro_step in range(accum):
            ids = torch.randint(0, vocab, (micro, seq), generator=generator).to(device)
            with meter.phase(f"step{step}.forward{micro_step}"):
                loss = engine(input_ids=ids, labels=ids).loss
            rank_file.write(result)
            last = micro_step == accum - 1
            with meter.phase(f"step{step}.backward{micro_step}"):
                engine.backward(loss)
                if not last:
                    engine.step()  # only counts the micro-step; DeepSpeed steps at the boundary
            rank_file.write(result)
            del loss
        with meter.phase(f"step{step}.step"):
            engine.step()
        step_times.append(time.perf_counter() - start)
        result["measured"]["step_times_s"] = list(step_times)
        rank_file.write(result)
    return step_times


def _finish(result: dict, meter, spec: dict, step_times: list[float]) -> None:
    from zeroest.validate.measure import summarize

    measured = result["measured"]
    phases = meter.phases
    measured.update(summarize(phases))
    training = {k: v for k, v in phases.items() if k.startswith("step")}
    first = {k: v for k, v in training.items() if k.startswith("step0.")}
    steady = {k: v for k, v in training.items() if not k.startswith("step0.")}
    measured["train_peak_allocated_bytes"] = summarize(training)["peak_allocated_bytes"]
    measured["train_peak_reserved_bytes"] = summarize(training)["peak_reserved_bytes"]
    measured["first_step"] = summarize(first)
    measured["steady"] = summarize(steady)
    setup = spec["setup"]
    tokens = setup["micro_batch"] * setup["seq_len"] * setup["grad_accum"] * int(setup["world_size"])
    steady_times = step_times[1:]
    measured["step_time_s"] = statistics.median(steady_times) if steady_times else None
    measured["tokens_per_s"] = tokens / measured["step_time_s"] if measured["step_time_s"] else None


def _train(spec: dict, meter, result: dict, rank_file: RankFile) -> None:
    start = time.perf_counter()
    import deepspeed
    import transformers  # noqa: F401 - imported here so that no phase counts import time
    from transformers import AutoModelForCausalLM  # noqa: F401

    result["measured"]["import_s"] = time.perf_counter() - start

    world_size = int(spec["setup"]["world_size"])
    rank_file.write(result)
    _init_distributed(spec, world_size)
    with meter.phase("build"):
        model = build_model(spec)
    rank_file.write(result)
    with meter.phase("init"):
        engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=spec["ds_config"],
        )
    del model
    rank_file.write(result)
    step_times = _steps(spec, engine, meter, result, rank_file)
    result["measured"]["skipped_steps"] = int(getattr(engine, "skipped_steps", 0) or 0)
    _finish(result, meter, spec, step_times)


def _environment(spec: dict) -> None:
    """Rank variables for a simulated rank 0 and the arch list DeepSpeed's JIT builds need."""
    from zeroest.validate.launch import fix_arch_list

    if spec["simulated"]:
        os.environ.update(
            {
                "RANK": "0",
                "LOCAL_RANK": "0",
                "WORLD_SIZE": str(spec["setup"]["world_size"]),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "29500",
            }
        )
    if spec["device"] == "cuda":
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        env = dict(os.environ)
        fix_arch_list(env, torch.cuda.get_device_capability())
        os.environ["TORCH_CUDA_ARCH_LIST"] = env["TORCH_CUDA_ARCH_LIST"]


def run_spec(spec: dict) -> int:
    """Run one rank of the spec's run; write ``rank<R>.json``; return the exit code."""
    import torch
    from zeroest.validate.measure import CpuMeter, Meter, is_oom

    _environment(spec)
    rank = int(os.environ.get("RANK", 0))
    rank_file = RankFile(Path(spec["run_dir"]), rank)
    cpu = spec["device"] == "cpu"
    meter = CpuMeter() if cpu else Meter(torch.device("cuda", torch.cuda.current_device()))
    result: dict = {
        "rank": rank,
        "world_size": int(spec["setup"]["world_size"]),
        "simulated": spec["simulated"],
        "complete": False,
        "error": None,
        "pid": os.getpid(),
        "measured": {"phases": meter.phases, "oom": None},
        "versions": versions(),
        "host": host_info(),
        "cpu" if cpu else "gpu": meter.device_info(),
    }
    code = EXIT_OK
    with meter.live if cpu else contextlib.nullcontext():
        try:
            _train(spec, meter, result, rank_file)
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a recorded row
            if is_oom(exc):
                result["measured"]["oom"] = meter.current or "unknown"
                code = EXIT_OOM
            else:
                code = EXIT_ERROR
            result["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            result["traceback"] = traceback.format_exc()[-4000:]
            if isinstance(exc, KeyboardInterrupt):
                raise
    if code != EXIT_OK:
        from zeroest.validate.measure import summarize

        result["measured"].update(summarize(meter.phases))
    result["complete"] = code == EXIT_OK
    rank_file.write(result)
    return code


def build_ops(names: list[str]) -> int:
    """JIT-build DeepSpeed ops once (``FusedAdamBuilder``, ``CPUAdamBuilder``) before runs race on the build
    lock."""
    from deepspeed.accelerator import get_accelerator

    _environment(
        {"simulated": False, "device": "cpu" if get_accelerator().device_name() == "cpu" else "cuda"}
    )
    for name in names:
        start = time.perf_counter()
        get_accelerator().create_op_builder(name).load()
        log.warning("built %s in %.1f s", name, time.perf_counter() - start)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m zeroest.validate.worker", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--spec", help="the run's spec.json (written by zeroest validate)")
    parser.add_argument(
        "--build-ops", default=None, help="comma-separated DeepSpeed op builders to JIT-build, then exit"
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if args.build_ops:
        return build_ops([n for n in args.build_ops.split(",") if n])
    if not args.spec:
        parser.error("--spec is required")
    spec = json.loads(Path(args.spec).read_text())
    return run_spec(spec)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: a rank that ran out of memory must not wait in atexit hooks for peers stuck in a collective.
    os._exit(code)

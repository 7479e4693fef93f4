"""One rank of one validation run: build the model, ``deepspeed.initialize``, train a few steps, measure
every phase.

Run per rank by torchrun / accelerate launch / the deepspeed launcher, or alone for a simulated rank 0 of an
N-rank job (fake process group) and on the CPU::

    python -m zeroest.validate.worker --spec OUT/work/<run>/spec.json

The spec (written by ``validate.runner``) holds the flat setup, the HF config dict, the ds_config, the mode
and the number of steps. After every phase the rank rewrites ``rank<R>.json`` next to the spec, so a run
killed by a timeout still leaves what it measured. Exit codes: 0 done, 3 out of memory (recorded in the
file), 1 any other error.

Phases: ``build`` (random-init HF model: whole on the host, or partitioned on the device under ``deepspeed.zero.Init``
for stage 3 with ``zero_init``, see ``build_model``), ``init`` (``deepspeed.initialize``), then for each step ``s``
and micro-step ``m``: ``step<s>.forward<m>``, ``step<s>.backward<m>``, and ``step<s>.step`` (the ``engine.step()`` at
the accumulation boundary; DeepSpeed wants ``engine.step()`` after every micro-step, and the ones before the boundary
only count, so they are measured inside ``backward<m>``). Step 0 is the warm-up; ``steady`` summarises steps 1 on.
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


def builds_under_zero_init(setup: dict) -> bool:
    """True when the setup's model is built inside ``deepspeed.zero.Init``: ZeRO stage 3 with ``zero_init``."""
    return int(setup["stage"]) == 3 and bool(setup.get("zero_init", False))


def hf_deepspeed_config(spec: dict):
    """transformers' ``HfDeepSpeedConfig`` of the run's ds_config when the model is built under zero.Init, else
    None. The caller keeps it alive while the model lives.

    This is what a user's job does before it builds the model: ``TrainingArguments(deepspeed=...)`` creates an
    ``HfTrainerDeepSpeedConfig`` (transformers/training_args.py ``__post_init__``), and accelerate's
    ``DeepSpeedPlugin.set_deepspeed_weakref`` an ``HfDeepSpeedConfig`` (accelerate/utils/dataclasses.py).
    transformers keeps only a weak reference to it (integrations/deepspeed.py ``set_hf_deepspeed_config``), and
    while it lives ``is_deepspeed_zero3_enabled()`` is its ``is_zero3()``.
    """
    if not builds_under_zero_init(spec["setup"]):
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(spec["ds_config"])


def _check_accelerate_flag(spec: dict) -> None:
    """Under ``accelerate launch``, refuse a ``zero3_init_flag`` that disagrees with the spec's zero_init.

    ``accelerate launch`` passes the config's flag as ``ACCELERATE_DEEPSPEED_ZERO3_INIT``
    (accelerate/utils/launch.py ``prepare_deepspeed_cmd_env``); ``DeepSpeedPlugin.__post_init__`` reads it. The
    worker makes no ``Accelerator`` (whose ``DeepSpeedPlugin.set_deepspeed_weakref`` would enable zero.Init at
    stage 3 whatever the flag says, accelerate 1.15): it builds as the spec's zero_init says under every
    launcher, and this check keeps the flag in the written config in step with that.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return
    flag = os.environ.get("ACCELERATE_DEEPSPEED_ZERO3_INIT")
    want = builds_under_zero_init(spec["setup"])
    if flag is not None and (flag.lower() == "true") != want:
        raise ValueError(
            f"accelerate launch set zero3_init_flag {flag} but the run's setup has zero_init "
            f"{str(want).lower()} at stage {spec['setup']['stage']}: the accelerate config is not the one "
            "zeroest wrote for this run; run it again with --redo"
        )


def partitioned(model) -> bool:
    """True when every parameter is a ZeRO-3 parameter (``ds_id`` is set by partition_parameters.py
    ``_convert_to_deepspeed_param``): the model was built under zero.Init."""
    params = list(model.parameters())
    return bool(params) and all(hasattr(p, "ds_id") for p in params)


def build_model(spec: dict):
    """The HF causal LM of the spec: random init from its config dict, or local weights from ``pretrained``.

    Built as transformers builds it for a user. Under zero.Init (stage 3 with zero_init: the caller holds
    ``hf_deepspeed_config(spec)``), ``from_config`` (modeling_utils.py ``_from_config``) and ``from_pretrained``
    (``get_init_context``) enter ``deepspeed.zero.Init(config_dict_or_path=deepspeed_config())`` themselves:
    each module's parameters are created on the rank's device (``Init`` overrides the tensor constructors to its
    ``local_device``, ``cuda:LOCAL_RANK``) and partitioned as the module's ``__init__`` returns
    (deepspeed/runtime/zero/partition_parameters.py ``Init._post_init_method`` -> ``_zero_init_param``), then
    ``initialize_weights_zero3`` initialises them a module at a time, gathered; so after the build each rank
    holds 1/N_d of the 16-bit parameters and the model was never whole.

    Otherwise the whole model is built on the host. On a GPU the random init runs there (HF's init of gpt2 in
    bf16 took 10-13 s on the H100 machine's CPUs), then the model moves to host memory and the CUDA cache is
    emptied, so ``deepspeed.initialize`` starts from a host model exactly as in a job that loads it on the host.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    setup = spec["setup"]
    zero_init = builds_under_zero_init(setup)
    if is_deepspeed_zero3_enabled() != zero_init:
        raise RuntimeError(
            f"zero_init is {zero_init} but transformers' is_deepspeed_zero3_enabled() is "
            f"{is_deepspeed_zero3_enabled()}: hold hf_deepspeed_config(spec) (and only then) while building"
        )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[setup["dtype"]]
    attn = _ATTN[setup.get("attn", "sdpa")]
    if spec.get("pretrained"):
        model = AutoModelForCausalLM.from_pretrained(
            spec["pretrained"], dtype=dtype, attn_implementation=attn
        )
    else:
        config_dict = dict(spec["model_config"])
        config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
        on_gpu = spec["device"] == "cuda" and not zero_init
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


def _finish(result: dict, meter, spec: dict, step_times: list[float]) -> None:
    from zeroest.validate.measure import summarize

    measured = result["measured"]
    phases = meter.phases
    measured.update(summarize(phases, with_build=builds_under_zero_init(spec["setup"])))
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
    from zeroest.validate.adapters import apply_adapters, parameter_groups
    from zeroest.validate.client_optimizers import client_optimizer
    from zeroest.validate.loops import train_steps

    result["measured"]["import_s"] = time.perf_counter() - start

    world_size = int(spec["setup"]["world_size"])
    rank_file.write(result)
    _check_accelerate_flag(spec)
    # zero.Init partitions over the process group that exists when the model is built, so the (fake or real)
    # group comes first; the HfDeepSpeedConfig lives until the run ends, as a job's TrainingArguments does.
    _init_distributed(spec, world_size)
    hf_config = hf_deepspeed_config(spec)
    with meter.phase("build"):
        model, counts = apply_adapters(build_model(spec), spec)
    result["measured"].update(counts)
    result["measured"]["built_partitioned"] = partitioned(model)
    rank_file.write(result)
    with meter.phase("init"):
        params = parameter_groups(model, spec["setup"].get("param_groups") or 1)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=spec["ds_config"],
                                          optimizer=client_optimizer(spec, params))
    del model
    rank_file.write(result)
    step_times = train_steps(spec, engine, meter, result, lambda: rank_file.write(result))
    result["measured"]["skipped_steps"] = int(getattr(engine, "skipped_steps", 0) or 0)
    _finish(result, meter, spec, step_times)
    del hf_config


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
    from zeroest.validate.emulate import emulate_card
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
    code = EXIT_OK if cpu else emulate_card(spec["setup"], result["gpu"])  # validate.emulate: run as that card
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
    if not cpu:
        result["gpu"]["allocator"] = allocator_record()
    if code != EXIT_OK:
        from zeroest.validate.measure import summarize

        result["measured"].update(summarize(meter.phases, with_build=builds_under_zero_init(spec["setup"])))
    result["complete"] = code == EXIT_OK
    rank_file.write(result)
    return code


def allocator_record() -> dict:
    """How the caching allocator ran: the settings the process read (``PYTORCH_ALLOC_CONF`` or
    ``PYTORCH_CUDA_ALLOC_CONF``) and whether its segments were expandable ones (the snapshot's
    ``is_expandable``; None where this torch does not say), so that a row says what it measured under."""
    import torch
    from zeroest.estimator.configs.allocator import conf_text

    segments = torch.cuda.memory_snapshot()
    flags = [seg["is_expandable"] for seg in segments if "is_expandable" in seg]
    return {"conf": conf_text(os.environ), "expandable_segments": any(flags) if flags else None}


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

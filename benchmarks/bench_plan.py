"""How fast is planning? Prints the wall time of a plan over >= 10,000 candidates and of ``max_micro_batch``.

Targets (issue 6): a plan over >= 10,000 candidate setups in at most 1 s; ``max_micro_batch`` in at most 20
ms. Also prints ``estimate()`` per call and the cost of its parts, to show where time goes. Closed-form
activations. Run: ``python benchmarks/bench_plan.py``. ``--device`` instead measures, on a CUDA GPU, what
``estimator/speed.py``'s constants stand for: dense bf16 matmul TFLOP/s and pinned host<->device GB/s.
"""

from __future__ import annotations

import statistics
import time


def _setup(model: str, gpus: int, seq: int):
    from zeroest.estimator.core.setup import Workload

    from zeroest import Parallelism, TrainingSetup, load_model

    return TrainingSetup(
        model=load_model(model),
        parallel=Parallelism(gpus_per_node=gpus),
        workload=Workload(seq_len=seq, activations="closed-form"),
    )


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_plan(model: str, gpu: str, gpus: int, seq: int, global_batch: int | None, limit: int) -> None:
    from zeroest.estimator.catalog.gpus import gpu_presets
    from zeroest.estimator.plan.plan import PlanRequest, SearchSpace, plan

    presets = {str(k): v for k, v in gpu_presets().items()}
    req = PlanRequest(
        base=_setup(model, gpus, seq),
        gpu=presets[gpu],
        global_batch=global_batch,
        space=SearchSpace(micro_batch_limit=limit),
    )
    start = time.perf_counter()
    result = plan(req)
    first = time.perf_counter() - start
    wall = _median_s(lambda: plan(req), 5)
    print(
        f"plan {model} on {gpus} x {gpu}, seq {seq}, global batch {global_batch}: "
        f"{result.considered:,} candidates, {result.evaluations} estimates, {result.fitting:,} fit: "
        f"first {first * 1e3:.0f} ms, then {wall * 1e3:.0f} ms (median of 5; target <= 1000)"
    )


def bench_max_micro_batch(model: str, gpu: str, gpus: int, seq: int, stage: int) -> None:
    from zeroest.estimator.catalog.gpus import gpu_presets
    from zeroest.estimator.plan.search import max_micro_batch

    presets = {str(k): v for k, v in gpu_presets().items()}
    setup = _setup(model, gpus, seq).with_stage(stage)
    answer = max_micro_batch(setup, presets[gpu].memory_bytes, 0.1)
    wall = _median_s(lambda: max_micro_batch(setup, presets[gpu].memory_bytes, 0.1), 10)
    print(
        f"max_micro_batch {model} ZeRO-{stage} on {gpus} x {gpu}, seq {seq}: {answer} in {wall * 1e3:.1f} ms "
        "(median of 10, fresh cache each; target <= 20)"
    )


def bench_estimate_parts(model: str) -> None:
    from zeroest.estimator.core.activations import activation_profile
    from zeroest.estimator.core.architecture import param_tensors
    from zeroest.estimator.core.estimate import model_states

    from zeroest import estimate

    setup = _setup(model, 8, 2048).with_stage(3)
    w = setup.workload
    parts = {
        "estimate()": lambda: estimate(setup),
        "  param_tensors()": lambda: param_tensors(setup.model),
        "  model_states()": lambda: model_states(setup),
        "  activation_profile(closed-form)": lambda: activation_profile(
            setup.model, w.micro_batch, w.seq_len, setup.dtype, w.attn, mode="closed-form"
        ),
    }
    for name, fn in parts.items():
        fn()
        print(f"{name} {model}: {_median_s(fn, 50) * 1e3:.2f} ms")


def bench_device() -> None:
    """bf16 8192^3 matmul TFLOP/s and pinned 1 GiB host<->device copies (GB/s = 10**9 bytes/s)."""
    import torch

    n, reps, size = 8192, 50, 1 << 30
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    tflops = 2 * n**3 * reps / (time.perf_counter() - start) / 1e12
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}: bf16 matmul {tflops:.0f} TFLOP/s")
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(size, dtype=torch.uint8, device="cuda")
    for name, copy in (
        ("host->device", lambda: dev.copy_(host, non_blocking=True)),
        ("device->host", lambda: host.copy_(dev, non_blocking=True)),
    ):
        copy()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            copy()
        torch.cuda.synchronize()
        print(f"pinned {name}: {10 * size / (time.perf_counter() - start) / 1e9:.1f} GB/s")


if __name__ == "__main__":
    import sys

    if "--device" in sys.argv:
        bench_device()
        sys.exit(0)
    bench_plan("llama-3-8b", "h100", 8, 4096, None, 1024)
    bench_plan("llama-3-8b", "4090", 8, 2048, 1024, 1024)
    bench_plan("llama-2-70b", "a100-80g", 16, 4096, None, 512)
    bench_max_micro_batch("llama-3-8b", "h100", 8, 2048, 3)
    bench_max_micro_batch("qwen2.5-0.5b", "4090", 1, 1024, 0)
    bench_estimate_parts("llama-3-8b")

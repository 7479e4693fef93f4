"""How fast is planning? Prints the wall time of a plan over >= 10,000 candidates and of ``max_micro_batch``.

Targets (issue 6): a plan over >= 10,000 candidate setups in at most 1 s; ``max_micro_batch`` in at most 20
ms. Also prints ``estimate()`` per call and the cost of its parts, to show where time goes. Closed-form
activations. Run: ``python benchmarks/bench_plan.py``.
"""

from __future__ import annotations

import statistics
import time


def _setup(model: str, gpus: int, seq: int):
    from zeroest.estimator.setup import Workload

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
    from zeroest.estimator.gpus import gpu_presets
    from zeroest.estimator.plan import PlanRequest, SearchSpace, plan

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
    from zeroest.estimator.gpus import gpu_presets
    from zeroest.estimator.search import max_micro_batch

    presets = {str(k): v for k, v in gpu_presets().items()}
    setup = _setup(model, gpus, seq).with_stage(stage)
    answer = max_micro_batch(setup, presets[gpu].memory_bytes, 0.1)
    wall = _median_s(lambda: max_micro_batch(setup, presets[gpu].memory_bytes, 0.1), 10)
    print(
        f"max_micro_batch {model} ZeRO-{stage} on {gpus} x {gpu}, seq {seq}: {answer} in {wall * 1e3:.1f} ms "
        "(median of 10, fresh cache each; target <= 20)"
    )


def bench_estimate_parts(model: str) -> None:
    from zeroest.estimator.activations import activation_profile
    from zeroest.estimator.architecture import param_tensors
    from zeroest.estimator.estimate import model_states

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


if __name__ == "__main__":
    bench_plan("llama-3-8b", "h100", 8, 4096, None, 1024)
    bench_plan("llama-3-8b", "4090", 8, 2048, 1024, 1024)
    bench_plan("llama-2-70b", "a100-80g", 16, 4096, None, 512)
    bench_max_micro_batch("llama-3-8b", "h100", 8, 2048, 3)
    bench_max_micro_batch("qwen2.5-0.5b", "4090", 1, 1024, 0)
    bench_estimate_parts("llama-3-8b")

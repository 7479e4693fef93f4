"""One ZeRO-1/2 + CPU-offload + checkpointing step on the GPU with the allocator's memory history: which tensors
are live at the backward peak (the 0.84 GiB that qwen2.5-1.5b ZeRO-2 misses, data/runs/h200-cards).

usage (GPU machine, after benchmarks/device_validate.sh installed DeepSpeed into /tmp/site):
  PYTHONPATH=/tmp/site:/tmp/zs python3 benchmarks/offload_backward_snapshot.py --stage 2 --out $OUT/snap2.json
Writes: the phase peaks, and the 25 largest live blocks at the backward peak with their allocation stacks.
"""

from __future__ import annotations

import argparse
import json
import os


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen2.5-1.5b")
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511",
                      LOCAL_SIZE="1")
    import deepspeed
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import AutoConfig, AutoModelForCausalLM
    from zeroest.estimator.catalog import models as presets
    from zeroest.validate.fakepg import init_fake_world

    dist.init_process_group(backend="fake", rank=0, world_size=2, store=FakeStore())
    init_fake_world(0, 2)  # as validate/worker.py _init_distributed does for a simulated rank
    deepspeed.init_distributed(dist_backend="gloo")
    torch.cuda.set_device(0)
    cfg = dict(presets.load_config(args.model)[1])
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg),
                                             dtype=torch.bfloat16, attn_implementation="sdpa")
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
          "zero_optimization": {"stage": args.stage, "offload_optimizer": {"device": "cpu", "pin_memory": True}},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq), device="cuda")
    peaks = {}
    for step in range(2):
        if step == 1:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        for name, fn in (("forward", lambda: engine(input_ids=ids, labels=ids).loss),):
            torch.cuda.reset_peak_memory_stats()
            loss = fn()
            peaks[f"{step}.{name}"] = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        engine.backward(loss)
        peaks[f"{step}.backward"] = torch.cuda.max_memory_allocated()
        del loss
        engine.step()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    live, best, best_at = {}, -1, []
    total = 0
    for event in snap["device_traces"][0]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
        if total > best:
            best, best_at = total, sorted(live.values(), key=lambda e: -e["size"])[:25]
    blocks = [{"gib": e["size"] / 2**30,
               "stack": [f"{f['filename'].split('site-packages/')[-1]}:{f['line']} {f['name']}"
                         for f in e.get("frames", []) if "torch/" not in f["filename"]][:6]} for e in best_at]
    with open(args.out, "w") as fh:
        json.dump({"peaks_gib": {k: v / 2**30 for k, v in peaks.items()}, "history_peak_gib": best / 2**30,
                   "largest_at_peak": blocks}, fh, indent=1)


if __name__ == "__main__":
    main()

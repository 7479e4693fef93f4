"""One short watched custom-loop job and one HF Trainer job on the GPU, then ``zeroest report`` of their rows.

    python benchmarks/gpu_watch_check.py --out OUT        # drives both jobs (torchrun, one rank each)
    ZEROEST_WATCH_TINY=1 python benchmarks/gpu_watch_check.py --out /tmp/w   # the same on the CPU, tiny model

Each job is a random-init llama (32k vocabulary, hidden 1024, 8 layers) in bf16 at micro-batch 4 x 1024 tokens,
accumulation 2, watched for 3 optimizer steps: the custom loop under ZeRO-2 and ZeRO-3 with DeepSpeed's FusedAdam
(``outputs`` reassigned each micro-step: the ``custom`` loop), the Trainer under ZeRO-2 with an "auto" ds_config
and ``optim="adamw_torch"`` (the ``trainer`` loop). Rows go to OUT/runs.jsonl; the warnings of each rank go to
its log (OUT/<job>.log). Takes about 2 minutes on one H200.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

MODEL = dict(model_type="llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
             num_attention_heads=16, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048)
MICRO, SEQ, ACCUM, STEPS = 4, 1024, 2, 3
if os.environ.get("ZEROEST_WATCH_TINY"):  # a CPU smoke run of this script: a tiny model, short sequences
    MODEL.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000)
    SEQ = 32


def _model():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(MODEL)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config),
                                             dtype=torch.bfloat16)
    model.config.use_cache = False
    return model


def custom(out: Path, stage: int) -> None:
    import deepspeed
    import torch

    import zeroest

    deepspeed.init_distributed()
    model = _model()
    ds = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": ACCUM, "bf16": {"enabled": True},
          "zero_optimization": {"stage": stage}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    gen = torch.Generator().manual_seed(0)
    with zeroest.watch(engine, steps=STEPS, out=out) as w:
        for _ in range((STEPS + 1) * ACCUM):
            ids = torch.randint(0, MODEL["vocab_size"], (MICRO, SEQ), generator=gen).to(engine.device)
            outputs = engine(input_ids=ids, labels=ids)
            engine.backward(outputs.loss)
            engine.step()
    _print(w.result)


def trainer(out: Path) -> None:
    import torch
    from transformers import Trainer, TrainingArguments

    from zeroest.integrations.hf import ZeroestCallback

    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 2}}
    args = TrainingArguments(output_dir=str(out.parent / "trainer-out"), per_device_train_batch_size=MICRO,
                             gradient_accumulation_steps=ACCUM, max_steps=STEPS + 1, learning_rate=1e-4,
                             deepspeed=ds, bf16=True, optim="adamw_torch", use_cpu=not torch.cuda.is_available(),
                             report_to=[], save_strategy="no",
                             logging_steps=1000)
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids}
            for ids in torch.randint(0, MODEL["vocab_size"], (MICRO * ACCUM * (STEPS + 1), SEQ), generator=gen)]
    callback = ZeroestCallback(steps=STEPS, out=out)
    Trainer(model=_model(), args=args, train_dataset=data, callbacks=[callback]).train()
    _print(callback.result)


def _print(result) -> None:
    checks = {c.phase: {"measured": c.measured_bytes, "predicted": c.predicted_bytes, "error": round(c.error, 4)}
              for c in result.checks}
    print("RESULT", json.dumps({"loop": result.loop, "checks": checks, "assumptions": list(result.assumptions)}))


def drive(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    runs = out / "runs.jsonl"
    code = 0
    for job in ("custom2", "custom3", "trainer"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", __file__, "--job", job,
               "--runs", str(runs)]
        with open(out / f"{job}.log", "w") as log:
            done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, timeout=600)
        print(job, "exit", done.returncode)
        print("\n".join(line for line in done.stdout.splitlines() if line.startswith("RESULT")))
        code = code or done.returncode
    report = subprocess.run([sys.executable, "-m", "zeroest", "report", str(runs)], capture_output=True, text=True)
    (out / "report.txt").write_text(report.stdout + report.stderr)
    print(report.stdout[-4000:], report.stderr[-2000:])
    return code or report.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="folder for runs.jsonl, logs and the report")
    parser.add_argument("--job", choices=("custom2", "custom3", "trainer"), help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if args.job is None:
        return drive(args.out or Path(os.environ.get("OUT", "watch-out")))
    if args.job == "trainer":
        trainer(args.runs)
    else:
        custom(args.runs, int(args.job[-1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

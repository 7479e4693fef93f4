"""``ZeroestCallback``: an HF Trainer job with a ZeRO-2 ds_config (HF "auto" values) as a validation run.

One gloo rank under torchrun, on the CPU (``use_cpu``), a tiny llama, accumulation 2, 3 optimizer steps, the
callback watching the first 2. The rows must parse with the report's reader, name the ``trainer`` loop (the Trainer
keeps only the loss of the forward), and hold the measured phases and the prediction. Bounds as in
``test_watch.py``: the model states (and the data set, on the CPU too) at the watch's start within 0.1%, each
phase the prediction (plus the data set) within 0.5%. With no ds_config optimizer section the Trainer's own
optimizer runs; ``optim="adamw_torch"`` is the torch path zeroest models (``adamw_torch_fused``, the default on
recent transformers, has no step temporaries: the estimate of its step is high, a warned over-prediction).
The Trainer's own optimizer has two parameter groups (weight decay and none), which the watch reads off the
engine: at ZeRO-2 the 16-bit gradients then live through the step (``model_states.shared_grads_through_step``,
b Psi at N_d = 1), and the estimate holds them, so no phase is warned about.
"""

from __future__ import annotations

import pytest
from test_watch import TINY, check_rows, torchrun

TRAINER = r'''
import json, os, sys, warnings
warnings.simplefilter("ignore")
import torch
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments
from zeroest.integrations.hf import ZeroestCallback

spec = json.loads(sys.argv[1])
args = TrainingArguments(output_dir="trainer-out", per_device_train_batch_size=2, gradient_accumulation_steps=2,
                         max_steps=3, learning_rate=1e-3, deepspeed=spec["ds_config"], use_cpu=True, bf16=True,
                         report_to=[], save_strategy="no", optim="adamw_torch", logging_steps=1000,
                         dataloader_num_workers=0)
config = dict(spec["model"])
model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
model.config.use_cache = False
gen = torch.Generator().manual_seed(0)
data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, config["vocab_size"], (16, 32), generator=gen)]
callback = ZeroestCallback(steps=2, out=spec["out"])
Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
result = callback.result
with open(f"result-{os.environ['RANK']}.json", "w") as f:
    json.dump({"loop": result.loop, "written": result.rows_written,
               "optimizer": [result.setup.optimizer.name, result.setup.optimizer.impl],
               "warned": [c.phase for c in result.checks if c.diverges(0.05)]}, f)
'''

DS_CONFIG = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
             "bf16": {"enabled": "auto"},
             "zero_optimization": {"stage": 2, "reduce_bucket_size": 200_000, "allgather_bucket_size": 200_000}}


@pytest.mark.slow
@pytest.mark.deepspeed
def test_trainer_callback_on_one_rank(tmp_path):
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")
    out = tmp_path / "runs" / "watch.jsonl"
    results = torchrun(tmp_path, TRAINER, {"model": TINY, "ds_config": DS_CONFIG, "out": str(out)}, nproc=1)
    assert results == [{"loop": "trainer", "written": 1, "optimizer": ["adamw", "torch"], "warned": []}]
    data_bytes = 16 * 32 * 8  # the data set: one int64 tensor of 16 x 32 token ids, alive all along
    (record,) = check_rows(out, ranks=1, loop="trainer", data_bytes=data_bytes)
    assert record.setup.workload.grad_accum == 2 and record.row.data["measured"]["watched_steps"] == 2
    assert record.setup.optimizer.param_groups == 2

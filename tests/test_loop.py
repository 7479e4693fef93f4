"""The training loop (``--loop``): what it keeps of the model's output object, modelled, defaulted and measured.

The one term is L = p * b * s * V bytes, the logits of ``CausalLMOutputWithPast`` in the model's dtype
(``core.timeline.loop_outputs_bytes``): custom holds it in forward (the previous micro-step's output), backward and
step; custom-del in backward and step; trainer nowhere. Checked here against the formula, against the live tensor
storages of a real HF model run through the validator's own loop (``validate.loops.train_steps``) on the CPU, and
end to end through ``zeroest validate --cpu`` with real DeepSpeed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner
from zeroest.estimator.catalog.models import load_model
from zeroest.estimator.configs.flat import setup_from_dict, setup_from_row, setup_to_dict
from zeroest.estimator.configs.read import setup_from_configs
from zeroest.estimator.core.architecture import shape_from_config
from zeroest.estimator.core.estimate import estimate
from zeroest.estimator.core.setup import DTYPE_BYTES, Parallelism, TrainingSetup, Workload, ZeroConfig
from zeroest.estimator.core.vocab import Builder, Loop, loop_default
from zeroest.estimator.plan.explain import LOOP_FIX, explain
from zeroest.validate.grid import load_grid

from zeroest.cli import app

HELD = {  # phase -> loops that hold the output's logits there, beyond the forward's own
    "init": (),
    "forward": (Loop.CUSTOM,),
    "backward": (Loop.CUSTOM, Loop.CUSTOM_DEL),
    "step": (Loop.CUSTOM, Loop.CUSTOM_DEL),
}
LOSS_BYTES = 4
"""The output's 0-d fp32 loss, left out of the model (one 512-byte block on the GPU): the trainer's own ``loss``
holds it through backward, so only in forward and step does a kept output hold it beyond the trainer's."""
TINY_LLAMA = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 8192, "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


def logits_bytes(setup: TrainingSetup) -> int:
    """L = p * b * s * V: the logits of the output object in the model's dtype."""
    w = setup.workload
    return DTYPE_BYTES[setup.dtype] * w.micro_batch * w.seq_len * setup.model.vocab_size


def make(model: str, stage: int, loop: str, *, world: int = 1, accum: int = 1, dtype: str = "bf16") -> TrainingSetup:
    return TrainingSetup(model=load_model(model), parallel=Parallelism(gpus_per_node=world), dtype=dtype,
                         zero=ZeroConfig(stage=stage),
                         workload=Workload(micro_batch=2, seq_len=1024, grad_accum=accum, loop=loop,
                                           activations="closed-form"))


CASES = [("tinyllama-1.1b", 0, 1, 1), ("gpt2", 1, 4, 4), ("qwen2.5-0.5b", 2, 4, 1), ("gemma-2b", 3, 8, 4),
         ("llama-3-8b", 3, 64, 1)]


@pytest.mark.parametrize("loop", [Loop.CUSTOM, Loop.CUSTOM_DEL])
@pytest.mark.parametrize(("model", "stage", "world", "accum"), CASES)
def test_each_phase_holds_the_logits_where_the_loop_keeps_them(model, stage, world, accum, loop):
    trainer = {p.name: p for p in estimate(make(model, stage, Loop.TRAINER, world=world, accum=accum)).phases}
    setup = make(model, stage, loop, world=world, accum=accum)
    big_l = logits_bytes(setup)
    for phase in estimate(setup).phases:
        extra = big_l if loop in HELD[phase.name] else 0
        assert phase.peak_bytes - trainer[phase.name].peak_bytes == extra, phase.name
        assert phase.components["activations"] - trainer[phase.name].components["activations"] == extra


def test_fp32_logits_are_four_bytes_an_element():
    setup = make("qwen2.5-0.5b", 2, Loop.CUSTOM, dtype="fp32")
    trainer = make("qwen2.5-0.5b", 2, Loop.TRAINER, dtype="fp32")
    step = {e: next(p for p in estimate(e).phases if p.name == "step").peak_bytes for e in (setup, trainer)}
    assert step[setup] - step[trainer] == 4 * 2 * 1024 * 151936


def test_the_default_is_the_conservative_loop_and_old_rows_are_the_trainers():
    assert Workload().loop == Loop.CUSTOM
    assert setup_from_dict({"model": "gpt2"}).workload.loop == Loop.CUSTOM
    assert setup_from_row({"model": "gpt2"}).workload.loop == Loop.TRAINER
    assert setup_from_row({"model": "gpt2", "loop": None}).workload.loop == Loop.TRAINER
    assert setup_from_row({"model": "gpt2", "loop": "custom-del"}).workload.loop == Loop.CUSTOM_DEL
    assert setup_to_dict(make("gpt2", 0, "custom-del"))["loop"] == "custom-del"


def test_an_old_row_is_estimated_exactly_as_before():
    row = {"model": "qwen2.5-0.5b", "stage": 2, "micro_batch": 2, "seq_len": 1024, "activations": "closed-form"}
    old = estimate(setup_from_row(row)).to_dict()
    trainer = estimate(setup_from_dict({**row, "loop": "trainer"})).to_dict()
    assert old["phases"] == trainer["phases"] and old["peak_allocated_bytes"] == trainer["peak_allocated_bytes"]


@pytest.mark.parametrize(("builder", "loop"), [(Builder.HF_TRAINER, Loop.TRAINER), (Builder.ACCELERATE, Loop.CUSTOM),
                                               (Builder.SCRIPT, Loop.CUSTOM), (None, Loop.CUSTOM)])
def test_loop_default_rule(builder, loop):
    assert loop_default(builder) == loop


@pytest.mark.parametrize(("config", "given", "loop"), [
    ({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}, None, Loop.TRAINER),
    ({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}}, None, Loop.CUSTOM),
    ({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}, "custom-del", Loop.CUSTOM_DEL),
])
def test_config_files_decide_the_loop_unless_given(tmp_path, config, given, loop):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    base = {"model": load_model("gpt2"), **({"loop": given} if given else {})}
    assert setup_from_configs(path, None, base)[0].workload.loop == loop


def test_an_accelerate_config_means_a_custom_loop(tmp_path):
    acc = tmp_path / "acc.yaml"
    acc.write_text("distributed_type: DEEPSPEED\nnum_processes: 2\ndeepspeed_config:\n  zero_stage: 2\n"
                   "  gradient_accumulation_steps: 1\nmixed_precision: bf16\n")
    setup, _ = setup_from_configs(None, acc, {"model": load_model("gpt2")})
    assert setup.workload.loop == Loop.CUSTOM
    setup, _ = setup_from_configs(None, acc, {"model": load_model("gpt2"), "loop": "trainer"})
    assert setup.workload.loop == Loop.TRAINER


def test_predict_prints_the_loop_and_refuses_an_unknown_one():
    runner = CliRunner()
    args = ["predict", "--params", "125M", "--stage", "0", "--json"]
    doc = json.loads(runner.invoke(app, args).stdout)
    assert doc["setup"]["loop"] == "custom"
    assert any(line.startswith("training loop custom") for line in doc["assumptions"])
    trainer = json.loads(runner.invoke(app, [*args, "--loop", "trainer"]).stdout)
    step = {d["setup"]["loop"]: d["phases"]["step"]["components"]["activations"] for d in (doc, trainer)}
    assert step == {"custom": 2 * 1 * 2048 * 32000, "trainer": 0}  # the standard shape's V = 32000, b s = 2048
    bad = runner.invoke(app, ["predict", "--params", "125M", "--loop", "hf"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output and "custom-del" in bad.output


def test_explain_names_the_loop_with_its_fix_only_when_it_costs_memory():
    custom = explain(estimate(make("gemma-2b", 3, Loop.CUSTOM, world=8)))
    named = [line for line in custom if line.startswith("the custom loop keeps")]
    assert len(named) == 1 and LOOP_FIX in named[0] and "2 x 1024 x 256000" in named[0]
    trainer = explain(estimate(make("gemma-2b", 3, Loop.TRAINER, world=8)))
    assert not any("loop keeps" in line or LOOP_FIX in line for line in trainer)


def test_report_breaks_errors_down_by_loop():
    from zeroest.report.analysis import DIMENSIONS

    old = SimpleNamespace(setup=setup_from_row({"model": "gpt2"}))
    new = SimpleNamespace(setup=setup_from_row({"model": "gpt2", "loop": "custom"}))
    assert (str(DIMENSIONS["loop"](old)), str(DIMENSIONS["loop"](new))) == ("trainer", "custom")


def test_the_loops_grid_covers_what_the_issue_asks():
    entries = load_grid("loops").entries
    by_loop: dict[str, list] = {}
    for e in entries:
        by_loop.setdefault(e.setup["loop"], []).append(e)
    assert set(by_loop) == set(Loop) and all(len(v) >= 10 for v in by_loop.values())
    vocabs = {load_model(e.setup["model"]).vocab_size for e in entries if e.setup["model"] != "llama-3.2-1b"}
    assert min(vocabs) == 32000 and max(vocabs) == 256000
    assert {e.setup["stage"] for e in entries} == {0, 1, 2, 3}
    assert {e.setup.get("grad_accum", 1) for e in entries} == {1, 4}
    assert all(e.setup.get("world_size", 1) > 1 for e in entries if e.simulate)
    assert any(e.simulate for e in entries) and any(not e.simulate for e in entries)


# ---- the real thing on the CPU ---------------------------------------------------------------------------------


def _tiny_model():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = dict(TINY_LLAMA)
    cfg = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.config.use_cache = False
    return model.train()


class _Engine:
    """What ``train_steps`` asks of a DeepSpeed engine: call, backward, step (zeroing at the boundary)."""

    def __init__(self, model, accum: int) -> None:
        self.module, self.device, self.accum, self.micro = model, "cpu", accum, 0

    def __call__(self, **batch):
        return self.module(**batch)

    def backward(self, loss) -> None:
        loss.backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.accum == 0:
            for p in self.module.parameters():
                p.grad = None


def test_the_output_object_holds_only_the_loss_and_the_logits():
    """``LlamaForCausalLM.forward(labels=..., use_cache=False)``: ``CausalLMOutputWithPast`` holds two tensors,
    the 0-d fp32 loss and the (b, s, V) logits in bf16; nothing else (cache, hidden states, attentions: None)."""
    torch = pytest.importorskip("torch")
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 32))
    out = _tiny_model()(input_ids=ids, labels=ids)
    tensors = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    assert set(tensors) == {"loss", "logits"}
    assert tensors["logits"].dtype == torch.bfloat16 and tuple(tensors["logits"].shape) == (2, 32, 8192)
    assert tensors["logits"].untyped_storage().nbytes() == 2 * 2 * 32 * 8192
    assert tensors["loss"].dim() == 0 and tensors["loss"].dtype == torch.float32


@pytest.mark.parametrize("accum", [1, 3])
def test_live_bytes_of_each_loop_differ_by_the_logits(accum):
    """The validator's loop on a real HF model, phase peaks of live storages (``CpuMeter``): each loop holds
    exactly L = 2 b s V more than the trainer's where the timeline says, in every steady micro-step."""
    torch = pytest.importorskip("torch")
    from zeroest.validate.loops import train_steps
    from zeroest.validate.measure import CpuMeter

    b, s = 2, 32
    big_l = 2 * b * s * TINY_LLAMA["vocab_size"]
    peaks = {}
    for loop in Loop:
        spec = {"steps": 3, "setup": {"micro_batch": b, "seq_len": s, "grad_accum": accum, "loop": str(loop)}}
        meter = CpuMeter()
        torch.manual_seed(0)
        with meter.live:
            train_steps(spec, _Engine(_tiny_model(), accum), meter, {"measured": {}}, lambda: None)
        peaks[loop] = {k: v["peak_allocated_bytes"] for k, v in meter.phases.items() if not k.startswith("step0.")}
    names = peaks[Loop.TRAINER].keys()
    assert len(names) == 2 * (2 * accum + 1)
    for loop in (Loop.CUSTOM, Loop.CUSTOM_DEL):
        for name in names:
            phase = "forward" if ".forward" in name else "backward" if ".backward" in name else "step"
            extra = big_l + (LOSS_BYTES if phase != "backward" else 0) if loop in HELD[phase] else 0
            assert peaks[loop][name] - peaks[Loop.TRAINER][name] == extra, (loop, name)


@pytest.mark.deepspeed
@pytest.mark.slow
def test_validate_runs_each_loop_and_the_estimate_follows(tmp_path):
    """``zeroest validate --cpu``, real DeepSpeed (stage 2, rank 0 of 4 on a fake group, accumulation 2): each row
    records its loop, the measured steady phases differ from the trainer's by L where the timeline says, and the
    prediction differs by the same L."""
    pytest.importorskip("deepspeed")
    fields = ", ".join(f"{k}: {json.dumps(v)}" for k, v in TINY_LLAMA.items())
    grid = tmp_path / "g.yaml"
    grid.write_text(f"models:\n  tiny-llama: {{{fields}}}\n"
                    "defaults: {model: tiny-llama, stage: 2, world_size: 4, simulate: true, dtype: bf16,"
                    " optimizer_impl: torch, micro_batch: 2, seq_len: 32, grad_accum: 2}\n"
                    "runs:\n  - {loop: trainer}\n  - {loop: custom}\n  - {loop: custom-del}\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "zeroest.validate", "--cpu", "--grid", str(grid), "--out", str(out), "--jobs", "3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    from zeroest.report.runs import read_rows

    rows = {row["setup"]["loop"]: row for row in read_rows(out / "runs.jsonl")}
    assert set(rows) == set(Loop)
    big_l = 2 * 2 * 32 * TINY_LLAMA["vocab_size"]
    shape = shape_from_config(TINY_LLAMA, "tiny-llama")
    assert shape.vocab_size == TINY_LLAMA["vocab_size"]

    def steady(row: dict, phase: str) -> int:
        return max(v["peak_allocated_bytes"] for k, v in row["measured"]["phases"].items()
                   if not k.startswith(("step0.", "build", "init")) and f".{phase}" in k)

    for loop in (Loop.CUSTOM, Loop.CUSTOM_DEL):
        for phase in ("forward", "backward", "step"):
            extra = big_l if loop in HELD[phase] else 0
            loss = LOSS_BYTES if extra and phase != "backward" else 0
            assert steady(rows[loop], phase) - steady(rows[Loop.TRAINER], phase) == extra + loss, (loop, phase)
            predicted = {k: rows[k]["prediction"]["phases"][phase]["peak_bytes"] for k in (loop, Loop.TRAINER)}
            assert predicted[loop] - predicted[Loop.TRAINER] == extra, (loop, phase)

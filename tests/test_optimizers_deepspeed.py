"""Optimizer states under real DeepSpeed 0.19 ZeRO on the CPU equal ``core.optimizers.state_bytes``.

Rank 0 of a 4-rank job on torch's fake process group (``validate.fakepg``) builds the probe's tiny llama
(``validate.dsprobe.build_model``), runs ``deepspeed.initialize`` with the ds_config ``configs.ds_write`` writes
(and the client optimizer ``validate.client_optimizers`` builds), trains two steps, and sums the bytes of every
tensor in the basic optimizer's ``state`` (plus Muon's staged momentum at stages 1-2). Under ZeRO the optimizer
sees 1-D flat partitions: Adafactor keeps a full variance, bitsandbytes one absmax per 256 elements of the flat;
at stage 0 in bf16 ``FP16_UnfusedOptimizer`` hands it fp32 copies with their shapes (Adafactor factors them).
"""

from __future__ import annotations

import pytest
from test_optimizers import LLAMA, total_params
from zeroest.estimator.configs.ds_write import ds_config
from zeroest.estimator.core.architecture import shape_from_config
from zeroest.estimator.core.model_states import flat_group_numel
from zeroest.estimator.core.optimizers import state_bytes
from zeroest.estimator.core.setup import Optimizer, Parallelism, TrainingSetup, Workload, ZeroConfig
from zeroest.estimator.core.stage3 import partition_numel

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]
WORLD = 4


def _setup(name: str, stage: int) -> TrainingSetup:
    return TrainingSetup(model=shape_from_config(LLAMA, "probe-llama"), parallel=Parallelism(gpus_per_node=WORLD),
                         dtype="bf16", optimizer=Optimizer(name=name), zero=ZeroConfig(stage=stage),
                         workload=Workload(micro_batch=1, seq_len=16, activations="closed-form"))


def _measured_state_bytes(setup: TrainingSetup) -> int:
    torch = pytest.importorskip("torch")
    deepspeed = pytest.importorskip("deepspeed")
    from zeroest.validate.client_optimizers import client_optimizer
    from zeroest.validate.dsprobe import build_model
    from zeroest.validate.fakepg import init_fake_world

    init_fake_world(0, WORLD)
    model = build_model("llama", "bf16")
    params = list(model.parameters())
    config = ds_config(setup)
    optimizer = client_optimizer({"setup": {"optimizer": setup.optimizer.name}}, params)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer, config=config)
    ids = torch.randint(0, LLAMA["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    total, seen = 0, set()
    for state in engine.optimizer.optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.numel() > 1 and value.untyped_storage().data_ptr() not in seen:
                seen.add(value.untyped_storage().data_ptr())
                total += value.numel() * value.element_size()
    staged = getattr(engine.optimizer, "_muon_pending_momentum", {})
    total += sum(t.numel() * t.element_size() for t, _ in staged.values())
    engine.destroy()
    return total


@pytest.mark.parametrize("stage", [0, 2, 3])
@pytest.mark.parametrize("name", ["adafactor", "adamw-8bit", "muon"])
def test_states_equal_deepspeed(name, stage):
    if name == "adamw-8bit":
        pytest.importorskip("bitsandbytes")
    setup = _setup(name, stage)
    held = {0: total_params(), 2: flat_group_numel(total_params(), WORLD) // WORLD,
            3: sum(partition_numel(t.numel, WORLD) for t in _tensors(setup))}[stage]
    assert _measured_state_bytes(setup) == state_bytes(setup, held)


def _tensors(setup: TrainingSetup):
    from zeroest.estimator.core.architecture import param_tensors

    return param_tensors(setup.model)

"""How many parameter elements ZeRO-3 holds gathered during forward and backward, measured on the CPU.

``gathered_elements(grad_ckpt, lora, reuse_distance)`` builds the probe's tiny llama (``validate.dsprobe``), optionally
with non-reentrant gradient checkpointing and peft LoRA (r = 8, all-linear), runs ZeRO-3 as rank 0 of N_d = 4 on the
fake process group with ``stage3_max_live_parameters`` and ``stage3_prefetch_bucket_size`` 1,000, and samples at every
module hook of the third step the elements of non-persistent parameters that are not NOT_AVAILABLE
(partition_parameters.py ``ZeroParamStatus``). It returns the largest forward and backward sample. This measures
``stage3.gathered_numel`` and ``stage3.recompute_gathered_numel`` (docs/DEEPSPEED_ALLOCATIONS.md, frozen parameters).

``python -m zeroest.validate.gathered [ckpt] [lora] [REUSE_DISTANCE]`` prints the two numbers.
"""

from __future__ import annotations

import sys
from typing import Any

REUSE_DISTANCE = 1000
"""``stage3_max_reuse_distance`` of the measurement; DeepSpeed's default is 1e9 (then ``__params_to_release`` keeps
every parameter used again within 1e9 elements of the trace: on this tiny model, nearly all of them)."""


def gathered_elements(grad_ckpt: bool, lora: bool, reuse_distance: int = REUSE_DISTANCE) -> dict[str, int]:
    """{"forward": n, "backward": n}: most non-persistent parameter elements gathered at once in the third step."""
    import deepspeed
    import torch
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from zeroest.validate.dsprobe import build_model
    from zeroest.validate.fakepg import init_fake_world

    init_fake_world(0, 4)
    model = build_model("llama", "bf16")
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules="all-linear"))
    zero = {"stage": 3, "stage3_max_live_parameters": 1000, "stage3_prefetch_bucket_size": 1000,
            "stage3_max_reuse_distance": reuse_distance, "stage3_param_persistence_threshold": 100_000,
            "reduce_bucket_size": 200_000}
    config = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}, "zero_optimization": zero,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    params = list(model.parameters())
    peaks: dict[str, int] = {}
    phase = ["forward"]

    def sample(*_: Any) -> None:
        n = sum(p.ds_numel for p in params if p.ds_status != ZeroParamStatus.NOT_AVAILABLE and not p.ds_persist)
        peaks[phase[0]] = max(peaks.get(phase[0], 0), n)

    for module in model.modules():
        module.register_forward_pre_hook(sample)
        module.register_forward_hook(sample)
        module.register_full_backward_pre_hook(sample)
        module.register_full_backward_hook(sample)
    ids = torch.randint(0, 1024, (1, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(3):  # the trace is complete from the second step on
        peaks.clear()
        phase[0] = "forward"
        loss = engine(input_ids=ids, labels=ids).loss
        phase[0] = "backward"
        engine.backward(loss)
        engine.step()
    engine.destroy()
    return dict(peaks)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    reuse = next((int(a) for a in args if a.isdigit()), REUSE_DISTANCE)
    print(gathered_elements("ckpt" in args, "lora" in args, reuse))


if __name__ == "__main__":
    main()

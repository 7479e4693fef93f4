"""Run on a larger GPU as if it were a smaller card: the setup's ``gpu_memory_bytes`` (``validate --emulate-gpu``).

Two things make a process on an H200 behave as on, say, a 24 GB RTX 4090:

* the caching allocator is capped at what the card leaves the allocator: ``M - C`` (M the card's memory, C the
  CUDA context ``Overheads.cuda_context_bytes``, which lives outside the allocator), through
  ``torch.cuda.set_per_process_memory_fraction((M - C) / total)``; a request beyond it raises
  ``torch.OutOfMemoryError`` as the small card would, and the worker records the run as an OOM;
* DeepSpeed's ``get_accelerator().available_memory()`` (accelerator/cuda_accelerator.py
  ``CUDA_Accelerator.available_memory``: NVML's ``free`` of the whole device), which stage_1_and_2.py
  ``DeepSpeedZeroOptimizer.__init__`` compares with the flat buffer's size, reports what the card would have free:
  ``M`` minus this process's NVML usage, or, where NVML cannot list processes (containers), ``M - C - reserved``.
  Without the patch it would report the H200's free memory, shared with the other runs on it.

The patch sets an attribute on the accelerator object DeepSpeed caches (real_accelerator.py ``get_accelerator``
returns one ``ds_accelerator``), so it must run before ``deepspeed.initialize``; the worker calls it (``emulate_card``)
right after selecting the device. NCCL's memory is not counted: emulated rows run on a fake process group.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def emulate(card_bytes: int, device_index: int) -> dict:
    """Cap this process at a card of ``card_bytes`` and make DeepSpeed see that card's free memory.

    Returns what the run records in its row's ``gpu.emulated``: the card's memory, the fraction set, the context
    assumed and the real device's total. ValueError when the real device is smaller than the card.
    """
    import torch
    from deepspeed.accelerator import get_accelerator
    from zeroest.estimator.core.overheads import Overheads
    from zeroest.validate.measure import _Nvml

    total = int(torch.cuda.get_device_properties(device_index).total_memory)
    if card_bytes > total:
        raise ValueError(f"cannot emulate a {card_bytes / 2**30:.1f} GiB card on a {total / 2**30:.1f} GiB GPU: "
                         "pick a smaller --emulate-gpu or run on the card itself")
    context = Overheads().cuda_context_bytes
    fraction = max(card_bytes - context, 0) / total
    torch.cuda.set_per_process_memory_fraction(fraction, device_index)
    nvml = _Nvml(torch.device("cuda", device_index))

    def available_memory(device_index=None) -> int:
        used, scope = nvml.used()
        if scope != "process":
            used = torch.cuda.memory_reserved() + context
        return max(card_bytes - used, 0)

    get_accelerator().available_memory = available_memory
    log.info("emulating a %.2f GiB card: allocator fraction %.4f of %.2f GiB", card_bytes / 2**30, fraction,
             total / 2**30)
    return {"memory_bytes": card_bytes, "fraction": fraction, "context_bytes": context, "total_bytes": total}


def emulate_card(setup: dict, gpu: dict) -> int:
    """The worker's hook: emulate the flat setup's ``gpu_memory_bytes`` card, if any, and record it in the row's
    ``gpu`` object as ``emulated``; returns the worker's 0 exit code so that the call fits the flow."""
    if setup.get("gpu_memory_bytes"):
        import torch

        gpu["emulated"] = emulate(int(setup["gpu_memory_bytes"]), torch.cuda.current_device())
    return 0

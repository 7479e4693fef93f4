"""Named overheads outside the model: CUDA context, NCCL, cuBLAS workspace, caching-allocator behaviour.

Each is a parameter with a documented default; ``zeroest report --fit`` fits them per GPU x torch x DeepSpeed
version and, with ``--write-calibration data/calibration``, writes
``data/calibration/<gpu>-torch<ver>-ds<ver>.json``, which ``catalog.calibration`` reads back.
This module is pure: no file is read here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from zeroest.estimator.units import MiB, round_up


@dataclass(frozen=True, kw_only=True)
class Overheads:
    """Memory the estimate adds beyond model states and activations.

    Defaults are ``zeroest report --fit`` on data/runs (64 ranks, one H100 80GB HBM3, torch 2.11, DeepSpeed
    0.19.8: data/calibration/nvidia-h100-80gb-hbm3-torch2.11-ds0.19.json), rounded; other GPUs and versions get
    their own calibration file when someone measures them.
    """

    cuda_context_bytes: int = 788 * MiB
    """Driver context + kernel images of torch, outside the caching allocator (what nvidia-smi shows for a process
    that only initialised CUDA). Fitted: 788 MiB on the H100 with torch 2.11."""
    cublas_workspace_bytes: int = 66 * MiB
    """cuBLAS/cuBLASLt workspaces torch allocates through the caching allocator at the first matmuls
    (aten/src/ATen/cuda/CublasHandlePool.cpp ``getChosenWorkspaceSize``: 32 MiB on sm_90, one per handle kind);
    fitted: 66 MiB."""
    nccl_communicator_bytes: int = 462 * MiB
    """Memory outside the allocator that a real NCCL process group costs a rank even at N_d = 1 (communicator
    set-up, its streams' workspaces); fitted from real runs (462 MiB), 0 on a fake process group."""
    nccl_bytes_per_peer: int = 0
    """NCCL buffers per peer rank of a real communicator (outside the allocator); 0 until real multi-GPU runs fit
    it. Simulated (fake process group) runs have none."""
    reserved_block_bytes: int = 2 * MiB
    """Large-pool segment granularity of the caching allocator (c10/cuda/CUDACachingAllocator.cpp
    ``kRoundLarge``): reserved memory comes in multiples of it."""
    reserved_fraction_of_peak: float = 0.152
    """Fraction of the peak allocation the allocator keeps reserved on top of it (cached blocks split to fit
    later requests, segments rounded up); fitted."""
    reserved_fraction_of_transient: float = 0.053
    """Fraction of the transient (activations and temporaries) at the peak that the allocator keeps reserved on top
    of the peak allocation through fragmentation; fitted."""
    reserved_fixed_bytes: int = 0
    """Constant reserved beyond the peak allocation (small-pool segments, rounding); fitted."""
    host_process_bytes: int = 1946 * MiB
    """Host RSS of a rank that holds no host states: the interpreter, torch and the CUDA libraries' host side,
    DeepSpeed, transformers and the model's Python objects (validate/measure.py ``rss_bytes`` from ``init`` on).
    Measured on the rows without offload in data/runs (torch 2.11, DeepSpeed 0.19.8): 1.66-2.08 GiB on ranks of a
    fake process group (median 1.82 GiB); 1.9 GiB covers all but one."""
    host_comm_bytes: int = 320 * MiB
    """Host RSS a real NCCL process group adds to a rank (its host-side buffers and threads): real ranks without
    offload measured 1.92-2.20 GiB (median 2.11 GiB), so B + C = 2.21 GiB covers them all; 0 on a fake group."""
    activation_scale: float = 1.0
    """Multiplier on modelled activations (1.0: the traced/closed-form bytes as they are); fitted per attention."""
    source: str = "defaults (fitted on H100 80GB, torch 2.11, DeepSpeed 0.19)"
    """Where these values come from: the defaults or a calibration file."""

    def to_dict(self) -> dict:
        return asdict(self)


def reserved_from(peak_bytes: float, transient_bytes: float, overheads: Overheads) -> float:
    """Predicted peak reserved: the peak allocation rounded to the allocator's segment size, plus what the cache
    keeps beyond it.

    c10/cuda/CUDACachingAllocator.cpp rounds large requests up to 2 MiB segments (``kRoundLarge``) and keeps freed
    blocks cached: a fitted fraction of the peak, a fitted fraction of the transient tensors of varying sizes
    (activations, temporaries) that leave cached holes, and a fitted constant.
    """
    peak = math.ceil(peak_bytes)
    return (round_up(peak, overheads.reserved_block_bytes) + overheads.reserved_fraction_of_peak * peak
            + overheads.reserved_fraction_of_transient * transient_bytes + overheads.reserved_fixed_bytes)


def device_from(reserved_bytes: float, overheads: Overheads, *, peers: int, real_comm: bool) -> float:
    """What nvidia-smi shows for the process: reserved + CUDA context + NCCL (a real process group's communicator
    and its per-peer buffers; none on a fake process group)."""
    nccl = overheads.nccl_communicator_bytes + overheads.nccl_bytes_per_peer * peers if real_comm else 0
    return reserved_bytes + overheads.cuda_context_bytes + nccl

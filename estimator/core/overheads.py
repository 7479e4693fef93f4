"""Named overheads outside the model: CUDA context, NCCL, cuBLAS workspace, caching-allocator behaviour (the
coefficients of the reserved-memory terms, ``core.reserved``).

Each is a parameter with a documented default; ``zeroest report --fit`` fits them per GPU x torch x DeepSpeed
version and, with ``--write-calibration data/calibration``, writes
``data/calibration/<gpu>-torch<ver>-ds<ver>.json``, which ``catalog.calibration`` reads back.
This module is pure: no file is read here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from zeroest.estimator.units import MiB


@dataclass(frozen=True, kw_only=True)
class Overheads:
    """Memory the estimate adds beyond model states and activations.

    Defaults are ``zeroest report --fit`` on data/runs (64 ranks, one H100 80GB HBM3, torch 2.11, DeepSpeed
    0.19.8: data/calibration/nvidia-h100-80gb-hbm3-torch2.11-ds0.19.json), rounded; other GPUs and versions get
    their own calibration file when someone measures them. The reserved coefficients (``core.reserved``) are the
    in-sample fit over both GPUs measured (304 ranks, H100 80GB HBM3 and H200, 61 of them with expandable
    segments, torch 2.11, DeepSpeed 0.19.8): ``zeroest report data/runs/h100-default data/runs/h100-holdout
    data/runs/h100-launchers data/runs/h200-* --fit --pool``, rounded, so that a GPU without its own file gets
    what carried over between these two.
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
    reserved_fraction_of_peak: float = 0.044
    """f_p of ``core.reserved``: reserved kept beyond the named terms, as a fraction of what they sum to (block
    splitting the terms leave out); fitted."""
    reserved_fraction_of_activations: float = 0.0
    """f_a of ``core.reserved``: the fraction of the activations the cache keeps as free pieces too small for
    later requests (many tensors of many sizes, freed in another order than made); fitted: 0 over both GPUs
    once the fp32 logits block has its own term (``reserved_fraction_of_logits``), 0.058 on the H100 alone."""
    reserved_reuse_fraction: float = 0.223
    """r of ``core.reserved``: the fraction of the free cache after backward that the first step's flat fp32
    buffers reuse, where one freed activation (the fp32 logits) is as large as such a buffer; fitted."""
    reserved_fraction_of_offload_grads: float = 0.434
    """f_o of ``core.reserved``: with optimizer offload, the fraction of the 16-bit gradients (b P) held in the
    cache while their copies to the host run on another stream (``record_stream``); fitted."""
    reserved_fraction_of_gathered: float = 0.860
    """f_g of ``core.reserved``: at stage 3, the fraction of the gathered parameters' bytes the cache keeps
    beyond them (all-gather blocks of every module's size); fitted."""
    reserved_fraction_of_logits: float = 0.881
    """f_L of ``core.reserved``: the fraction of one fp32 logits block (4 bytes x batch x sequence x vocabulary)
    the cache keeps reserved beside the blocks that reuse its segment; fitted."""
    reserved_fraction_expandable: float = 0.605
    """f_x of ``core.reserved``: with expandable segments, the share of the default allocator's free cache beyond
    the peak (its terms' reserve less the peak allocation) that stays reserved as holes between live blocks;
    fitted on the rows measured with ``expandable_segments`` (data/runs/h200-expandable, h200-expandable2,
    h200-expandable3)."""
    reserved_fixed_bytes: int = 0
    """c of ``core.reserved``: a constant reserved beyond the terms (small-pool segments); fitted, >= 0."""
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
    source: str = "defaults (fitted on H100 80GB and H200, torch 2.11, DeepSpeed 0.19)"
    """Where these values come from: the defaults or a calibration file."""

    def to_dict(self) -> dict:
        return asdict(self)


def device_from(reserved_bytes: float, overheads: Overheads, *, peers: int, real_comm: bool) -> float:
    """What nvidia-smi shows for the process: reserved + CUDA context + NCCL (a real process group's communicator
    and its per-peer buffers; none on a fake process group)."""
    nccl = overheads.nccl_communicator_bytes + overheads.nccl_bytes_per_peer * peers if real_comm else 0
    return reserved_bytes + overheads.cuda_context_bytes + nccl


def allocator_limit_bytes(card_bytes: int, overheads: Overheads, *, peers: int, real_comm: bool) -> int:
    """L: what the caching allocator may hold on a card of ``card_bytes``: the card less the CUDA context and NCCL's
    memory (``device_from`` of nothing), the limit ``set_per_process_memory_fraction`` sets on an emulated card."""
    return round(card_bytes - device_from(0, overheads, peers=peers, real_comm=real_comm))

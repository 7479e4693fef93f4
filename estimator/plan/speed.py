"""A step-time proxy to rank setups that fit: compute, ZeRO communication, and offload traffic, in seconds.

This is a ranking aid, not a performance model: terms are added with no overlap (an upper bound where
DeepSpeed overlaps them), attention FLOPs and kernel efficiency are left out, and every constant is a
datasheet figure or a measurement named below. Symbols inside formulas: P parameters, T tokens per rank per
optimizer step (micro-batch x sequence x accumulation), N = N_d ranks, b bytes per 16-bit value (4 in fp32
training), A accumulation steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from zeroest.estimator.catalog.gpus import Gpu
from zeroest.estimator.core.setup import DTYPE_BYTES, TrainingSetup, ZeroStage
from zeroest.estimator.units import GB

TFLOPS = 10**12
"""FLOP/s in a TFLOP/s."""

ACHIEVED_FRACTION_OF_PEAK = 0.5
"""Fraction of peak tensor-core FLOP/s a training step reaches: Narayanan et al. 2021 (arXiv 2104.04473, Table
1) report 44-52% of A100 peak for GPT models of 1.7B-1T parameters."""

INTER_NODE_BYTES_PER_S = 100 * GB // 8
"""One 100 Gbit/s NIC per node (12.5 GB/s per direction): the link a ring all-reduce crosses between nodes."""

NVME_BYTES_PER_S = 3 * GB
"""One PCIe Gen3 x4 NVMe SSD per node, about 3 GB/s sequential (3.5 GB/s read, 3.3 GB/s write on e.g. Samsung
970 EVO Plus's datasheet), shared by the node's ranks."""

CPU_ADAM_PARAMS_PER_S = 1 * 10**9
"""fp32 parameters DeepSpeedCPUAdam updates per second per rank. Measured 1.2e9-1.6e9 on a 2-core AMD EPYC VM
(deepspeed 0.19.8, one flat group of 2e7-1e8 parameters, ``DeepSpeedCPUAdam.step``); rounded down."""

PCIE4_BYTES_PER_S = 32 * GB
"""PCIe 4.0 x16, per direction (16 GT/s x 16 lanes, 128b/130b: 31.5 GB/s)."""
H100_PINNED_COPY_BYTES_PER_S = 52 * GB
"""Pinned 1 GiB host-to-device copies measured on an H100 80GB HBM3 (torch 2.11.0+cu130): 51.9 GB/s up,
55.1 GB/s down (``benchmarks/bench_plan.py --device``); what offload traffic gets of PCIe 5.0's 63 GB/s. The
same run measured 750 TFLOP/s on a bf16 8192^3 matmul, 76% of the dense peak below."""


@dataclass(frozen=True, kw_only=True)
class Hardware:
    """What the proxy needs to know about a GPU and its node."""

    name: str
    peak_flops: float
    """Dense 16-bit (bf16, or fp16 where the GPU has no bf16) tensor-core FLOP/s with fp32 accumulate."""
    intra_node_bytes_per_s: float
    """GPU-to-GPU bandwidth inside a node, per direction (NVLink, else PCIe through the host)."""
    pcie_bytes_per_s: float
    """Host-to-GPU bandwidth per direction (offload traffic)."""
    inter_node_bytes_per_s: float = INTER_NODE_BYTES_PER_S
    """Node-to-node bandwidth per direction."""
    nvme_bytes_per_s: float = NVME_BYTES_PER_S
    """NVMe bandwidth per node."""
    cpu_adam_params_per_s: float = CPU_ADAM_PARAMS_PER_S
    """DeepSpeedCPUAdam throughput per rank."""
    source: str = ""
    """Where the figures come from."""


HARDWARE: dict[str, Hardware] = {
    "4090": Hardware(
        name="RTX 4090",
        peak_flops=165.2 * TFLOPS,
        intra_node_bytes_per_s=PCIE4_BYTES_PER_S,
        pcie_bytes_per_s=PCIE4_BYTES_PER_S,
        source="NVIDIA Ada Lovelace whitepaper v1.01: 165.2 TFLOP/s bf16 (fp32 accumulate); PCIe 4.0",
    ),
    "3090": Hardware(
        name="RTX 3090",
        peak_flops=71 * TFLOPS,
        intra_node_bytes_per_s=PCIE4_BYTES_PER_S,
        pcie_bytes_per_s=PCIE4_BYTES_PER_S,
        source="NVIDIA GA102 whitepaper: 71 TFLOP/s bf16 (fp32 accumulate); PCIe 4.0",
    ),
    "l4": Hardware(
        name="L4",
        peak_flops=121 * TFLOPS,
        intra_node_bytes_per_s=PCIE4_BYTES_PER_S,
        pcie_bytes_per_s=PCIE4_BYTES_PER_S,
        source="NVIDIA L4 datasheet: 242 TFLOP/s bf16 with sparsity, 121 dense; PCIe 4.0",
    ),
    "a10g": Hardware(
        name="A10G",
        peak_flops=125 * TFLOPS,
        intra_node_bytes_per_s=PCIE4_BYTES_PER_S,
        pcie_bytes_per_s=PCIE4_BYTES_PER_S,
        source="NVIDIA A10 datasheet: 125 TFLOP/s bf16 dense (the A10G's own figure is not published)",
    ),
    "v100-32g": Hardware(
        name="V100 SXM2",
        peak_flops=125 * TFLOPS,
        intra_node_bytes_per_s=150 * GB,
        pcie_bytes_per_s=16 * GB,
        source="NVIDIA V100 datasheet: 125 TFLOP/s fp16 tensor (no bf16); NVLink 300 GB/s total; PCIe 3.0",
    ),
    "a100-40g": Hardware(
        name="A100 SXM4",
        peak_flops=312 * TFLOPS,
        intra_node_bytes_per_s=300 * GB,
        pcie_bytes_per_s=PCIE4_BYTES_PER_S,
        source="NVIDIA A100 datasheet: 312 TFLOP/s bf16 dense; NVLink 600 GB/s total; PCIe 4.0",
    ),
    "a100-80g": Hardware(
        name="A100 SXM4",
        peak_flops=312 * TFLOPS,
        intra_node_bytes_per_s=300 * GB,
        pcie_bytes_per_s=PCIE4_BYTES_PER_S,
        source="NVIDIA A100 datasheet: 312 TFLOP/s bf16 dense; NVLink 600 GB/s total; PCIe 4.0",
    ),
    "h100": Hardware(
        name="H100 SXM5",
        peak_flops=989 * TFLOPS,
        intra_node_bytes_per_s=450 * GB,
        pcie_bytes_per_s=H100_PINNED_COPY_BYTES_PER_S,
        source="NVIDIA H100 datasheet: 1979 TFLOP/s bf16 with sparsity, 989 dense; NVLink 900 GB/s "
        "total; PCIe 5.0, measured 52 GB/s pinned",
    ),
    "h200": Hardware(
        name="H200 SXM",
        peak_flops=989 * TFLOPS,
        intra_node_bytes_per_s=450 * GB,
        pcie_bytes_per_s=H100_PINNED_COPY_BYTES_PER_S,
        source="NVIDIA H200 datasheet: 1979 TFLOP/s bf16 with sparsity, 989 dense; NVLink 900 GB/s "
        "total; PCIe 5.0 as the H100's (measured there: 52 GB/s pinned)",
    ),
}
DEFAULT_HARDWARE_KEY = "a100-80g"
"""GPUs given only by size (``--gpu 24GiB``) are ranked as if A100s: the ranking, not the seconds, is what
counts."""


def hardware_for(gpu: Gpu) -> Hardware:
    """The preset's figures for a GPU from ``gpus.parse_gpu``; a bare size gets ``DEFAULT_HARDWARE_KEY``'s."""
    return HARDWARE.get(gpu.preset or "", HARDWARE[DEFAULT_HARDWARE_KEY])


@dataclass(frozen=True, kw_only=True)
class StepTime:
    """Seconds of one optimizer step per term (no overlap assumed)."""

    compute_s: float
    comm_s: float
    offload_s: float
    tokens_per_step: int
    """Tokens of the whole job per optimizer step: micro-batch x sequence x accumulation x N_d."""

    @property
    def total_s(self) -> float:
        return self.compute_s + self.comm_s + self.offload_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.total_s if self.total_s else float("inf")


def compute_flops(setup: TrainingSetup, n_params: int) -> float:
    """FLOPs per rank per step: (6 + 2 c) P T, c = 1 with gradient checkpointing.

    6 P per token for forward (2 P) and backward (4 P) (Kaplan et al. 2020, arXiv 2001.08361, Sec. 2.1);
    checkpointing runs each layer's forward again in backward, 2 P more (Narayanan et al. 2021, arXiv
    2104.04473, Sec. 5.1: 4 forward-equivalents instead of 3).
    """
    w = setup.workload
    tokens = w.micro_batch * w.seq_len * w.grad_accum
    return (6 + (2 if w.grad_ckpt else 0)) * n_params * tokens


def comm_bytes(setup: TrainingSetup, n_params: int) -> float:
    """Bytes one rank sends per step for ZeRO's collectives, ring algorithm: volume x (N - 1) / N.

    ZeRO paper (Rajbhandari et al. 2020, arXiv 1910.02054, Sec. 7): stages 0-2 move 2 Psi per step
    (reduce-scatter of gradients + all-gather of parameters, or one all-reduce), stage 3 moves 3 Psi
    (parameters gathered in forward and again in backward, gradients reduce-scattered), Psi = b P bytes. With
    accumulation DeepSpeed reduces stage 2 gradients at every micro-step (stage_1_and_2.py
    ``reduce_ready_partitions_and_remove_grads``: ``if self.partition_gradients or
    self.is_gradient_accumulation_boundary()``) and stage 3 gathers and reduces at every micro-step; stages
    0-1 reduce only at the accumulation boundary. So per step: stages 0-1 2 Psi, stage 2 (A + 1) Psi, stage 3
    3 A Psi.
    """
    world = setup.world_size
    if world == 1:
        return 0.0
    psi = DTYPE_BYTES[setup.dtype] * n_params
    accum = setup.workload.grad_accum
    volume = {
        ZeroStage.DISABLED: 2,
        ZeroStage.OPTIMIZER_STATES: 2,
        ZeroStage.GRADIENTS: accum + 1,
        ZeroStage.PARAMETERS: 3 * accum,
    }[setup.stage] * psi
    return volume * (world - 1) / world


def offload_seconds(setup: TrainingSetup, n_params: int, hw: Hardware) -> float:
    """Seconds per step moving offloaded states over PCIe (and NVMe), plus DeepSpeedCPUAdam's update.

    ZeRO-Offload (Ren et al. 2021, arXiv 2101.06840, Sec. 4.1): each rank sends its b P / N gradient partition
    to the host and receives b P / N updated parameters; stage 2-3 gradients go down at every micro-step. The
    host runs Adam over its P / N fp32 partition. Parameter offload (ZeRO-Infinity, Rajbhandari et al. 2021,
    arXiv 2104.07857) brings each rank's b P / N partition up before each forward and backward gather (2 A
    times). NVMe: optimizer offload reads and writes the fp32 master weights and states ((4 + 4 S) P / N each
    way), shared by the node's ranks; parameter offload reads b P / N per gather.
    """
    zero = setup.zero
    if zero.offload_optimizer == "none":
        return 0.0
    b = DTYPE_BYTES[setup.dtype]
    part = n_params / setup.world_size
    accum = setup.workload.grad_accum
    grad_sends = accum if setup.stage >= ZeroStage.GRADIENTS else 1
    pcie = (grad_sends + 1) * b * part
    seconds = part / hw.cpu_adam_params_per_s
    per_rank_nvme = hw.nvme_bytes_per_s / setup.parallel.gpus_per_node
    if zero.offload_optimizer == "nvme":
        seconds += 2 * (4 + 4 * setup.optimizer.states_per_param) * part / per_rank_nvme
    if zero.offload_params != "none":
        pcie += 2 * accum * b * part
        if zero.offload_params == "nvme":
            seconds += 2 * accum * b * part / per_rank_nvme
    return seconds + pcie / hw.pcie_bytes_per_s


def step_time(setup: TrainingSetup, n_params: int, hw: Hardware) -> StepTime:
    """The proxy for ``setup`` on ``hw``: compute at ``ACHIEVED_FRACTION_OF_PEAK`` + communication + offload.

    Communication runs at the intra-node bandwidth on one node and at the slower of intra- and inter-node
    bandwidth across nodes (a ring is as fast as its slowest link).
    """
    w = setup.workload
    link = (
        hw.intra_node_bytes_per_s
        if setup.parallel.nodes == 1
        else min(hw.intra_node_bytes_per_s, hw.inter_node_bytes_per_s)
    )
    return StepTime(
        compute_s=compute_flops(setup, n_params) / (hw.peak_flops * ACHIEVED_FRACTION_OF_PEAK),
        comm_s=comm_bytes(setup, n_params) / link,
        offload_s=offload_seconds(setup, n_params, hw),
        tokens_per_step=w.micro_batch * w.seq_len * w.grad_accum * setup.world_size,
    )

"""The ZeRO paper's model-state memory (Rajbhandari et al., arXiv 1910.02054, Section 5.1, Figure 1, Table 1).

Mixed-precision Adam keeps 2 Psi bytes of fp16 parameters, 2 Psi of fp16 gradients and K Psi of optimizer states
(fp32 master weights, momentum and variance: K = 12). Per device, with N_d data-parallel ranks:

* stage 0 (baseline):  (2 + 2 + K) Psi
* P_os   (stage 1):     2 Psi + 2 Psi + K Psi / N_d
* P_os+g (stage 2):     2 Psi + (2 + K) Psi / N_d
* P_os+g+p (stage 3):  (2 + 2 + K) Psi / N_d

Figure 1's example (Psi = 7.5B, N_d = 64, K = 12) gives 120, 31.4, 16.6 and 1.9 GB (10**9 bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

PAPER_K = 12
"""Optimizer-state multiplier K of mixed-precision Adam (paper Section 3.1)."""


@dataclass(frozen=True, kw_only=True)
class PaperStates:
    """The paper's three model-state terms per device, in bytes (floats: the paper's Psi need not be an integer)."""

    params_bytes: float
    grads_bytes: float
    optimizer_states_bytes: float

    @property
    def total_bytes(self) -> float:
        return self.params_bytes + self.grads_bytes + self.optimizer_states_bytes


def paper_states(n_params: float, world_size: int, stage: int, k: int = PAPER_K) -> PaperStates:
    """Per-device model states of ZeRO stage ``stage`` in the paper's terms (Figure 1 / Table 1)."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    if world_size < 1:
        raise ValueError(f"N_d must be at least 1, got {world_size}")
    psi = float(n_params)
    return PaperStates(
        params_bytes=2 * psi / (world_size if stage >= 3 else 1),
        grads_bytes=2 * psi / (world_size if stage >= 2 else 1),
        optimizer_states_bytes=k * psi / (world_size if stage >= 1 else 1),
    )


def paper_reduction(world_size: int, stage: int, k: int = PAPER_K) -> float:
    """Memory reduction of ``stage`` over stage 0 at N_d ranks: 16 / (per-device multiplier); limits 4x, 8x, N_d."""
    return paper_states(1.0, world_size, 0, k).total_bytes / paper_states(1.0, world_size, stage, k).total_bytes

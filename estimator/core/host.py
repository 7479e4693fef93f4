"""Host RAM of one rank and of one node: the terms that sum to ``Estimate.cpu_bytes_per_node``.

Per rank (R) and per node of g ranks (``Parallelism.gpus_per_node``):

    R    = B + C + bP + H_pinned + H_pageable        (B process baseline, C real-communicator extra)
    node = g * R

* B, C: ``Overheads.host_process_bytes`` and ``Overheads.host_comm_bytes`` (C only with a real NCCL process group:
  a fake one, as in simulated rows, has none);
* bP: the full 16-bit model every rank loads before DeepSpeed partitions it (transformers ``from_pretrained`` on
  the host, then ``deepspeed.initialize`` moves it to the GPU); it is freed once the engine holds the model, so
  adding it to the held terms bounds the peak from above (a node whose ranks all load at once);
* H_pinned, H_pageable: the offload terms of ``ModelStates.host_bytes`` (``model_states.offload_host_bytes``,
  ``stage3.stage3_states``), split by ``ModelStates.host_pageable_bytes``.

What a measured rank's RSS shows after ``deepspeed.initialize`` (validate/measure.py ``rss_bytes``, the largest
from ``init`` on) is ``held_bytes`` = R - bP; the build phase's RSS holds the load copy.
"""

from __future__ import annotations

from dataclasses import dataclass

from zeroest.estimator.core.model_states import ModelStates
from zeroest.estimator.core.overheads import Overheads
from zeroest.estimator.core.setup import DTYPE_BYTES, TrainingSetup
from zeroest.estimator.units import format_gib


@dataclass(frozen=True, kw_only=True)
class HostTerms:
    """Host RAM of one rank by term (bytes); ``per_rank_bytes`` is their sum."""

    process_bytes: int
    """B + C: the torch/DeepSpeed process itself (``Overheads.host_process_bytes``, ``host_comm_bytes``)."""
    model_load_bytes: int
    """bP: the full-model copy every rank loads."""
    pinned_bytes: int
    """Offload buffers DeepSpeed page-locks (master partition at stages 1-2, fp32 gradient partitions, 16-bit
    copies, staging buffers; powers of two with ``pin_memory``)."""
    pageable_bytes: int
    """CPU optimizer states (and stage 3's fp32 master), pageable."""
    ranks_per_node: int

    @property
    def held_bytes(self) -> int:
        """What a rank holds from ``deepspeed.initialize`` on: everything but the load copy."""
        return self.process_bytes + self.pinned_bytes + self.pageable_bytes

    @property
    def per_rank_bytes(self) -> int:
        return self.held_bytes + self.model_load_bytes

    @property
    def per_node_bytes(self) -> int:
        return self.ranks_per_node * self.per_rank_bytes

    def components(self) -> dict[str, int]:
        """The terms of one rank by name; they sum to ``per_rank_bytes``."""
        return {"process": self.process_bytes, "model_load": self.model_load_bytes, "pinned": self.pinned_bytes,
                "pageable": self.pageable_bytes}


def host_terms(setup: TrainingSetup, numel: int, states: ModelStates, overheads: Overheads, *,
               real_comm: bool) -> HostTerms:
    """The host RAM terms of one rank of ``setup`` (``numel`` its parameter count)."""
    return HostTerms(
        process_bytes=overheads.host_process_bytes + (overheads.host_comm_bytes if real_comm else 0),
        model_load_bytes=DTYPE_BYTES[setup.dtype] * numel,
        pinned_bytes=states.host_bytes - states.host_pageable_bytes,
        pageable_bytes=states.host_pageable_bytes,
        ranks_per_node=setup.parallel.gpus_per_node,
    )


def host_note(host: HostTerms) -> str:
    """The assumption behind host RAM per node, for ``Estimate.assumptions``."""
    parts = [f"{format_gib(host.process_bytes, 2)} process", f"{format_gib(host.model_load_bytes, 2)} model load"]
    if host.pinned_bytes or host.pageable_bytes:
        parts += [f"{format_gib(host.pinned_bytes, 2)} pinned", f"{format_gib(host.pageable_bytes, 2)} pageable"]
    return (f"host RAM per node: {host.ranks_per_node} ranks x ({' + '.join(parts)}); every rank's load copy counted "
            "with its states (all ranks loading at once, the larger case)")

"""Run DeepSpeed as one rank of an N-rank job on a CPU, without the other N-1 ranks.

``init_fake_world(rank, world_size)`` initialises ``torch.distributed`` with torch's fake process group
(``torch.testing._internal.distributed.fake_pg``: backend ``"fake"`` on a ``FakeStore``): collectives return
at once
without moving data, so one process sees ``get_world_size() == world_size`` and allocates exactly what that
rank of
a real job allocates (every ZeRO buffer size depends only on the world size and the rank, never on received
data).
DeepSpeed is then pointed at the group that already exists: ``deepspeed.init_distributed`` finds
``torch.distributed.is_initialized()`` and wraps it in its ``TorchBackend`` (deepspeed/comm/comm.py
``init_distributed``), which is all ``deepspeed.initialize`` needs.

``run_gloo(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)`` on real gloo ranks (spawned
processes on
this CPU) and returns each rank's result, for the cases where real communication matters (world size 2
checks).

One process can host one world at a time: ``init_fake_world`` tears down a world of a different size first,
and
resets DeepSpeed's cached groups (deepspeed/utils/groups.py module globals) so the next engine sees the new
size.
"""

from __future__ import annotations

import logging
import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

_DS_GROUP_GLOBALS = (
    "_EXPERT_PARALLEL_GROUP",
    "_EXPERT_DATA_PARALLEL_GROUP",
    "_WORLD_GROUP",
    "_ZERO_PARAM_INTRA_PARALLEL_GROUP",
    "_DATA_PARALLEL_GROUP",
    "_SEQUENCE_PARALLEL_GROUP",
    "_SEQUENCE_DATA_PARALLEL_GROUP",
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _set_env(rank: int, world_size: int, port: int) -> None:
    # No LOCAL_SIZE: with it equal to the world size, DeepSpeed's CPU shm comm op (ops/csrc/cpu/comm/
    # shm_interface.cpp ``initialize``) waits for its peers in shared memory, which hangs a fake world.
    os.environ.pop("LOCAL_SIZE", None)
    os.environ.update(
        LOCAL_RANK=str(rank),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def _reset_deepspeed_groups() -> None:
    """Forget DeepSpeed's cached process groups (deepspeed/utils/groups.py) so a new world is picked up."""
    try:
        from deepspeed.utils import groups
    except ImportError:
        return
    for name in _DS_GROUP_GLOBALS:
        if hasattr(groups, name):
            setattr(groups, name, {} if isinstance(getattr(groups, name), dict) else None)


def init_fake_world(rank: int, world_size: int) -> None:
    """Make this process rank ``rank`` of a ``world_size``-rank job on the fake process group, ready for
    DeepSpeed.

    Idempotent for the same world size; a world of another size (or a real backend) is destroyed first.
    """
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}: pass a rank below the world size")
    if dist.is_initialized():
        same = (
            dist.get_backend() == "fake" and dist.get_world_size() == world_size and dist.get_rank() == rank
        )
        if same:
            return
        dist.destroy_process_group()
        _reset_deepspeed_groups()
    _set_env(rank, world_size, port=29500)
    dist.init_process_group(backend="fake", rank=rank, world_size=world_size, store=FakeStore())
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    logger.debug("fake world: rank %d of %d", rank, world_size)


def close_world() -> None:
    """Destroy this process's process group, if any, and forget DeepSpeed's cached groups (a test that made a
    fake world leaves none behind for the next)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
        _reset_deepspeed_groups()


def _gloo_child(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue: Any) -> None:
    try:
        import torch.distributed as dist

        _set_env(rank, world_size, port)
        dist.init_process_group(backend="gloo", rank=rank, world_size=world_size)
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        result = fn(rank, world_size, *args)
        queue.put((rank, True, result))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the traceback
        queue.put((rank, False, traceback.format_exc()))


def run_gloo(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 300.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks on this CPU; results by rank.

    ``fn`` must be importable (a module-level function) and return something picklable. A rank that raises
    makes
    this raise ``RuntimeError`` carrying that rank's traceback; ranks still running after ``timeout_s`` are
    killed.
    """
    import queue as queue_mod

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results: Any = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_gloo_child, args=(rank, world_size, port, fn, args, results), daemon=True)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    out: dict[int, Any] = {}
    try:
        while len(out) < world_size:
            try:
                rank, ok, value = results.get(timeout=timeout_s)
            except queue_mod.Empty as exc:
                raise RuntimeError(
                    f"gloo ranks timed out after {timeout_s} s; got ranks {sorted(out)}"
                ) from exc
            if not ok:
                raise RuntimeError(f"gloo rank {rank} of {world_size} failed:\n{value}")
            out[rank] = value
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    return [out[rank] for rank in range(world_size)]

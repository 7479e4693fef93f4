"""How one validation run is started: the child environment and the launcher command line.

Every run is a fresh process tree (so CUDA peaks and caching-allocator state never leak between runs):

* ``torchrun``: ``python -m torch.distributed.run --nproc-per-node N ... -m zeroest.validate.worker --spec
  S``;
* ``accelerate``: ``python -m accelerate.commands.launch --config_file A -m zeroest.validate.worker --spec
  S``, with the accelerate config ``estimator.configs.accelerate_write.accelerate_yaml`` writes for the run
  (``deepspeed_config_file`` is the run's ds_config.json, ``zero3_init_flag`` the setup's zero_init at stage 3);
* ``deepspeed``: ``python -m deepspeed.launcher.runner --num_gpus N --module zeroest.validate.worker --spec
  S``;
* simulated runs (rank 0 of an N-rank job on a fake process group) need no launcher: ``python -m
  zeroest.validate.worker --spec S``.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from zeroest.estimator.configs import allocator

log = logging.getLogger(__name__)

Launcher = Literal["torchrun", "accelerate", "deepspeed"]
LAUNCHERS: tuple[str, ...] = ("torchrun", "accelerate", "deepspeed")
WORKER_MODULE = "zeroest.validate.worker"

_ARCH_LIST = re.compile(r"^\s*\d+\.\d+(\+PTX)?([\s;]+\d+\.\d+(\+PTX)?)*\s*$")
"""What DeepSpeed's op builder parses in TORCH_CUDA_ARCH_LIST (``op_builder/builder.py``
``compute_capability_args``): ``8.0;9.0+PTX``. Arch-specific names such as ``9.0a`` break it."""

MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
"""NVLink multicast stays off unless the user set these: a multicast fault can take a shared host's GPUs
down."""


def arch_list_ok(value: str | None) -> bool:
    """True when ``value`` is a TORCH_CUDA_ARCH_LIST that DeepSpeed's JIT builder can parse."""
    return bool(value) and bool(_ARCH_LIST.match(value))


def fix_arch_list(env: dict[str, str], capability: tuple[int, int] | None) -> None:
    """Set TORCH_CUDA_ARCH_LIST to the device's ``major.minor`` (``9.0``, never ``9.0a``) when unset or
    unparseable."""
    if capability is None or arch_list_ok(env.get("TORCH_CUDA_ARCH_LIST")):
        return
    arch = f"{capability[0]}.{capability[1]}"
    if env.get("TORCH_CUDA_ARCH_LIST"):
        log.warning(
            "TORCH_CUDA_ARCH_LIST=%r cannot be parsed by DeepSpeed; using %s",
            env["TORCH_CUDA_ARCH_LIST"],
            arch,
        )
    env["TORCH_CUDA_ARCH_LIST"] = arch


def package_root() -> str:
    """The directory from which ``import zeroest`` works (put on the children's PYTHONPATH)."""
    import zeroest

    return str(Path(zeroest.__file__).resolve().parent.parent)


def child_env(
    base: Mapping[str, str],
    *,
    cpu: bool,
    capability: tuple[int, int] | None,
    gpus: str | None = None,
    threads: int | None = None,
    expandable_segments: bool | None = None,
) -> dict[str, str]:
    """The environment of every process of a run: the user's (NCCL_* and PYTHONPATH included) plus our fixes.

    ``gpus``: CUDA_VISIBLE_DEVICES for the run (None keeps the user's). CPU runs hide the GPUs and make
    DeepSpeed pick its CPU accelerator (``DS_ACCELERATOR=cpu``). ``threads``: OMP_NUM_THREADS unless the user
    set it (concurrent runs share the cores; torchrun would otherwise give each rank all of them, or force 1).
    ``expandable_segments``: the run's setup's (None keeps the user's allocator settings): written into both
    variables torch reads its settings from, the user's other options kept, so that the run allocates as the
    estimate assumed whichever variable the user had set.
    """
    env = dict(base)
    if expandable_segments is not None:
        conf = allocator.with_expandable(allocator.conf_text(env), expandable_segments)
        env.update(dict.fromkeys(allocator.CONF_VARIABLES, conf))
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(max(1, threads)))
    for key, value in MULTICAST_OFF.items():
        env.setdefault(key, value)
    env["PYTHONUNBUFFERED"] = "1"
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    root = package_root()
    if root not in paths:
        paths.append(root)
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if cpu:
        env["DS_ACCELERATOR"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        fix_arch_list(env, capability)
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus
    return env


FORWARDED_PREFIXES = ("NCCL_", "TORCH_CUDA_ARCH_LIST", "TORCH_SYMM_MEM_", "NVSHMEM_", "OMP_NUM_THREADS",
                      *allocator.CONF_VARIABLES)
"""Variables written to ``.deepspeed_env`` for the deepspeed launcher's remote nodes (it forwards PYTHON* and the
accelerator's own NCCL* by itself, ``deepspeed/launcher/runner.py`` ``EXPORT_ENVS``)."""


def deepspeed_env_file(env: Mapping[str, str]) -> str:
    """The ``.deepspeed_env`` text (KEY=VALUE lines) that carries our fixes to the ranks on other nodes."""
    keys = sorted(key for key in env if key.startswith(FORWARDED_PREFIXES) or key == "PYTHONPATH")
    return "".join(f"{key}={env[key]}\n" for key in keys)


def free_port() -> int:
    """A TCP port free on this host right now (for the rendezvous of one run)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True, kw_only=True)
class LaunchOptions:
    """Launcher and multi-node flags, passed through to the launcher of every run."""

    launcher: Launcher = "torchrun"
    """torchrun, accelerate or deepspeed."""
    nnodes: int = 1
    """Nodes in each run (``--nnodes``); run ``validate`` on every node with its ``--node-rank``."""
    node_rank: int = 0
    """This node's rank (``--node-rank``)."""
    master_addr: str = "127.0.0.1"
    """Rendezvous host (``--master-addr``)."""
    master_port: int | None = None
    """Rendezvous port; None picks a free port per run (single node only)."""
    hostfile: str | None = None
    """DeepSpeed hostfile (``--hostfile``), deepspeed launcher only."""

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"unknown launcher {self.launcher!r}: use --launcher torchrun, accelerate or deepspeed")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--nnodes {self.nnodes} --node-rank {self.node_rank}: give 1 or more nodes and a node "
                             "rank from 0 to nnodes - 1")
        if self.master_port is not None and not 1 <= self.master_port <= 65535:
            raise ValueError(f"--master-port {self.master_port} is not a TCP port: give one from 1 to 65535")
        if self.nnodes > 1 and self.master_port is None:
            raise ValueError("multi-node runs need one rendezvous port on every node: set --master-port")
        if self.hostfile is not None and self.launcher != "deepspeed":
            raise ValueError("--hostfile is read by the deepspeed launcher only: add --launcher deepspeed")


def launch_command(
    opts: LaunchOptions,
    *,
    nproc: int,
    spec_path: Path,
    simulated: bool,
    port: int,
    accelerate_config: Path | None,
) -> list[str]:
    """The command line of one run; ``nproc`` ranks on this node."""
    worker = ["--spec", str(spec_path)]
    python = sys.executable
    if simulated:
        return [python, "-m", WORKER_MODULE, *worker]
    if opts.launcher == "torchrun":
        return [
            python,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={nproc}",
            f"--nnodes={opts.nnodes}",
            f"--node-rank={opts.node_rank}",
            f"--master-addr={opts.master_addr}",
            f"--master-port={port}",
            "-m",
            WORKER_MODULE,
            *worker,
        ]
    if opts.launcher == "accelerate":
        if accelerate_config is None:
            raise ValueError("the accelerate launcher needs its generated config file")
        return [
            python,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(accelerate_config),
            "-m",
            WORKER_MODULE,
            *worker,
        ]
    cmd = [
        python,
        "-m",
        "deepspeed.launcher.runner",
        f"--master_port={port}",
        f"--master_addr={opts.master_addr}",
    ]
    if opts.hostfile:
        cmd += ["--hostfile", opts.hostfile, f"--num_nodes={opts.nnodes}", f"--num_gpus={nproc}"]
    else:
        cmd += [f"--num_gpus={nproc}"]
    return [*cmd, "--module", WORKER_MODULE, *worker]

"""Process groups, created explicitly from how a process was launched (no import-time globals).

Two groups over the same ranks:
- ``model``: the model's collectives (the all-reduce after attention and after the MoE) and device-side
  broadcasts (sampled ids feeding a step launched ahead). NCCL when the ranks compute on CUDA, gloo on CPU.
- ``control``: gloo, always on CPU tensors: the step messages the driver (rank 0) broadcasts to the workers.
  Kept apart so a worker can wait for the next step as long as the server idles (a long timeout) while every
  wait of the driver stays bounded by ``collective_timeout_s``.

A process joins either as one of the workers the driver spawned on its own host (``DistributedInit.spawned``:
the driver's TCPStore address comes on the command line) or under ``torchrun`` (``DistributedInit.from_env``:
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, read once). Not here: what runs over the groups.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# A worker waits for the driver's next message for as long as the server idles.
WORKER_CONTROL_TIMEOUT = timedelta(days=7)
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedInit:
    """How this process joins the group: its rank, the group size, its GPU index on its host, and where the
    rendezvous store listens (rank 0 hosts it)."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "spawn" (the driver started this process) or "torchrun"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DistributedInit | None:
        """The torchrun launch this process is part of, or None when it was not started by torchrun."""
        env = os.environ if environ is None else environ
        if "WORLD_SIZE" not in env or "RANK" not in env:
            return None
        missing = [v for v in _TORCHRUN_VARS if v not in env]
        if missing:
            raise RuntimeError(f"torchrun-style launch without {missing} in the environment; start the ranks with "
                               f"torchrun (it sets {', '.join(_TORCHRUN_VARS)})")
        try:
            return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), env["MASTER_ADDR"],
                       int(env["MASTER_PORT"]), "torchrun")
        except ValueError as exc:
            raise RuntimeError(f"torchrun's environment has a non-integer rank, size or port: {exc}") from exc


@dataclass
class ProcessGroups:
    """This process's place in the group and the two groups it talks over."""

    rank: int
    world_size: int
    device: torch.device
    model: dist.ProcessGroup
    control: dist.ProcessGroup

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def destroy(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def rank_device(device_type: str, local_rank: int) -> torch.device:
    """Each rank computes on the GPU of its local rank (cuda:LOCAL_RANK); on CPU all share the host."""
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local_rank} needs GPU {local_rank}, but this host shows "
                               f"{torch.cuda.device_count()} GPU(s); launch at most that many ranks per host")
        return torch.device("cuda", local_rank)
    if device_type != "cpu":
        raise ValueError(f"tensor parallelism runs on 'cuda' or 'cpu', not {device_type!r}")
    return torch.device("cpu")


def init_process_groups(init: DistributedInit, device_type: str, timeout_s: float,
                        store: dist.Store | None = None) -> ProcessGroups:
    """Join the default (model) group and create the control group. Spawned: rank 0 passes the TCPStore it
    created before starting the workers, which connect to it at ``master_addr:master_port``. torchrun: env://."""
    device = rank_device(device_type, init.local_rank)
    timeout = timedelta(seconds=timeout_s)
    where: dict[str, object]
    if init.launcher == "torchrun":
        # torchrun's agent may host the store itself (TORCHELASTIC_USE_AGENT_STORE): env:// knows which.
        where = {"init_method": "env://"}
    else:
        if store is None:
            store = dist.TCPStore(init.master_addr, init.master_port, init.world_size, is_master=False,
                                  timeout=timeout)
        where = {"store": store}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=init.rank, world_size=init.world_size, timeout=timeout,
                                device_id=device, **where)  # type: ignore[arg-type]
    else:
        dist.init_process_group("gloo", rank=init.rank, world_size=init.world_size, timeout=timeout,
                                **where)  # type: ignore[arg-type]
    control_timeout = timeout if init.rank == 0 else WORKER_CONTROL_TIMEOUT
    control = dist.new_group(backend="gloo", timeout=control_timeout)
    model = dist.group.WORLD
    assert model is not None
    if device.type == "cuda":
        # NCCL sets up its communicator on the first collective; it must not happen inside a CUDA graph capture.
        warm = torch.zeros(1, device=device)
        dist.all_reduce(warm, group=model)
        torch.cuda.synchronize(device)
    return ProcessGroups(init.rank, init.world_size, device, model, control)

"""How setup commands end: every rank tells every other whether it succeeded (and one number), in one gather.

Loading a shard, building a runner, planning and allocating the KV cache can fail on one rank only (a missing
file on one host, one GPU out of memory). Each such command ends with :func:`exchange_status`, an all-gather of a
fixed-size status over the control group, so the driver raises an error naming the rank and its message, and
every worker sees the failure too and stops instead of waiting for a step that will never come.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from mixtral.distributed.errors import WorkerFailedError

STATUS_SLOTS = 512  # [failed, value, message length, message bytes...]


@dataclass(frozen=True)
class RankStatus:
    rank: int
    error: str | None
    value: int = 0


def exchange_status(group: dist.ProcessGroup, error: str | None, value: int = 0) -> list[RankStatus]:
    """All-gather (failed, value, message) over ``group``; the result is the same list on every rank."""
    data = error.encode()[:STATUS_SLOTS - 3] if error is not None else b""
    buf = torch.zeros(STATUS_SLOTS, dtype=torch.int64)
    buf[0], buf[1], buf[2] = int(error is not None), value, len(data)
    if data:
        buf[3:3 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
    out = [torch.empty_like(buf) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, buf, group=group)
    statuses = []
    for rank, t in enumerate(out):
        message = bytes(t[3:3 + int(t[2])].to(torch.uint8).tolist()).decode(errors="replace") if t[0] else None
        statuses.append(RankStatus(rank, message, int(t[1])))
    return statuses


def raise_failures(statuses: list[RankStatus], what: str) -> None:
    """Raise ``WorkerFailedError`` listing each rank that failed ``what``."""
    failed = [s for s in statuses if s.error is not None]
    if failed:
        lines = "; ".join(f"rank {s.rank}: {s.error}" for s in failed)
        raise WorkerFailedError(f"{what} failed on {len(failed)} of {len(statuses)} rank(s): {lines}")

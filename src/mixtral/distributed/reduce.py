"""The all-reduce that finishes a tensor-parallel layer, installed as each TransformerBlock's ``all_reduce`` hook.

Placement: after attention (``wo`` is row parallel: each rank's [N, D] is the sum over its own heads) and after
the MoE (TP: the sum over the rank's slice of every expert's FFN width; EP: the sum over the rank's experts).
Why an all-reduce for EP rather than an all-to-all dispatch of tokens to their experts' ranks: attention is
tensor parallel, so every rank already holds every token's hidden state; each rank runs its own experts on the
tokens routed to them and the outputs are summed, which is the collective the attention needs anyway. A
dispatch would add two all-to-alls (tokens out, results back) and, to give attention its full batch again, an
all-gather, in place of the reduce half of the all-reduce: it moves fewer bytes only from 2k/N < 1, i.e. N > 4
ranks for top-2, and costs more launches at decode sizes, where latency rules (numbers in docs/PARALLEL.md).

Every rank gets the same sum (NCCL and gloo reduce each chunk once and share it), so the routers, which see the
summed hidden states, pick the same experts on every rank. The call is capturable in a CUDA graph (NCCL).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class AllReduce:
    """Sum a [N, D] tensor over ``group`` in place and return it."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x


def install_all_reduce(model: nn.Module, group: dist.ProcessGroup) -> None:
    """Make every block of ``model`` (a rank's shard) sum its partial outputs over ``group``."""
    hook = AllReduce(group)
    for layer in model.layers:  # type: ignore[union-attr]
        layer.all_reduce = hook


def time_all_reduce(group: dist.ProcessGroup, sizes: list[int], dim: int, dtype: torch.dtype,
                    device: torch.device, iters: int) -> dict[int, float]:
    """Median seconds of one all-reduce of a [n, dim] tensor for each n in ``sizes`` (every rank calls this in
    lockstep; the driver's figures are the group's)."""
    import time

    out: dict[int, float] = {}
    for n in sizes:
        x = torch.zeros(n, dim, dtype=dtype, device=device)
        for _ in range(3):  # warm-up: NCCL picks its algorithm, gloo opens its pairs
            dist.all_reduce(x, group=group)
        times = []
        for _ in range(iters):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            dist.all_reduce(x, group=group)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        out[n] = sorted(times)[len(times) // 2]
    return out

"""ParallelConfig: how one model is spread over ranks (tensor and expert parallelism), validated on construction.

Layouts (``N`` = ``tensor_parallel_size`` = the number of ranks, one process per GPU):

- **TP N** (``--tensor-parallel-size N``): attention heads split N ways (column-parallel ``wqkv``, row-parallel
  ``wo``); every expert's FFN width F split N ways (``w13`` rows, ``w2`` columns).
- **EP N** (``--tensor-parallel-size N --enable-expert-parallel``, vLLM's meaning): attention as in TP N; whole
  experts placed on ranks, ``E / N`` each.
- **TP a x EP b** on ``N = a * b`` ranks (``--tensor-parallel-size N --expert-parallel-size b``; TensorRT-LLM's
  ``moe_tp_size x moe_ep_size = tp_size``): attention TP N; experts in ``b`` groups of ``E / b``, each group's
  experts split on F over the group's ``a`` ranks. "TP 2 x EP 2" is 4 ranks: attention over 4, experts 0-3 on
  ranks 0-1 (F halves), experts 4-7 on ranks 2-3. Consecutive ranks share an expert group, so the partners of
  an F split sit on one host.

In every layout each rank's attention and MoE outputs are partial sums of the full ones, so one all-reduce over
all ranks after each finishes the layer (distributed/reduce.py). KV heads are split like query heads while N
divides ``n_kv_heads``; past that (N > 8 for Mixtral) each KV head is replicated on ``N / n_kv_heads`` ranks.

A rank's model is an ordinary ``Transformer`` over :meth:`RankLayout.shard_args` (its own head counts and FFN
width), so whatever sizes itself from the model's args (the KV cache, memory planning) sizes the shard. Not here:
process groups (groups.py), loading (sharded_loader.py), the engine side (executor.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mixtral.distributed.errors import ParallelConfigError

if TYPE_CHECKING:
    from mixtral.model.args import ModelArgs


@dataclass(frozen=True)
class ParallelConfig:
    """- ``tensor_parallel_size``: ranks (GPUs) one model is spread over; attention is split over all of them.
    - ``enable_expert_parallel``: place whole experts on ranks instead of splitting every expert's FFN width.
    - ``expert_parallel_size``: ranks the experts are spread over (implies ``enable_expert_parallel``); None with
      EP on = all ranks. Must divide ``tensor_parallel_size``; the rest of the factor splits each expert's F.
    - ``collective_timeout_s``: the longest the driver waits on any collective before declaring the group dead.
    - ``exit_on_worker_failure``: when a worker process dies, report it and exit the process with status 1
      (servers, whose supervisor restarts them); False raises ``WorkerFailedError`` from the engine instead
      (the offline ``LLM``).
    """

    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False
    expert_parallel_size: int | None = None
    collective_timeout_s: float = 300.0
    exit_on_worker_failure: bool = False

    def __post_init__(self) -> None:
        tp = self.tensor_parallel_size
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ParallelConfigError(f"tensor_parallel_size must be a positive integer, got {tp!r}")
        ep = self.expert_parallel_size
        if ep is not None:
            if not isinstance(ep, int) or isinstance(ep, bool) or ep < 1:
                raise ParallelConfigError(f"expert_parallel_size must be a positive integer, got {ep!r}")
            if tp % ep:
                raise ParallelConfigError(
                    f"expert_parallel_size {ep} must divide tensor_parallel_size {tp} (the rest of the factor "
                    f"splits each expert's FFN width)"
                )
            if ep > 1:
                object.__setattr__(self, "enable_expert_parallel", True)
        if not self.collective_timeout_s > 0:
            raise ParallelConfigError(f"collective_timeout_s must be > 0, got {self.collective_timeout_s!r}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def ep_size(self) -> int:
        """Expert groups: ranks the experts are spread over."""
        if not self.enable_expert_parallel:
            return 1
        return self.expert_parallel_size or self.tensor_parallel_size

    @property
    def moe_tp_size(self) -> int:
        """Ranks each expert's FFN width is split over."""
        return self.tensor_parallel_size // self.ep_size

    def describe(self) -> str:
        """"TP 4", "EP 4" (attention TP 4), "TP 2 x EP 2" (attention TP 4)."""
        if self.ep_size == 1:
            return f"TP {self.tensor_parallel_size}"
        moe = f"EP {self.ep_size}" if self.moe_tp_size == 1 else f"TP {self.moe_tp_size} x EP {self.ep_size}"
        return f"{moe} (attention TP {self.tensor_parallel_size})"

    def check_model(self, args: ModelArgs) -> None:
        """Raise ``ParallelConfigError`` naming the shape that this layout cannot split evenly."""
        n = self.tensor_parallel_size
        problems = []
        if args.n_heads % n:
            problems.append(f"n_heads ({args.n_heads}) is not divisible by tensor_parallel_size {n}")
        if n <= args.n_kv_heads:
            if args.n_kv_heads % n:
                problems.append(f"n_kv_heads ({args.n_kv_heads}) is not divisible by tensor_parallel_size {n}")
        elif n % args.n_kv_heads:
            problems.append(f"tensor_parallel_size {n} exceeds n_kv_heads ({args.n_kv_heads}) and is not a "
                            f"multiple of it (each KV head must be replicated on a whole number of ranks)")
        if args.num_experts % self.ep_size:
            problems.append(f"num_experts ({args.num_experts}) is not divisible by the expert-parallel size "
                            f"{self.ep_size}")
        if args.hidden_dim % self.moe_tp_size:
            problems.append(f"the expert FFN width hidden_dim ({args.hidden_dim}) is not divisible by "
                            f"{self.moe_tp_size} (the ranks each expert is split over)")
        if problems:
            raise ParallelConfigError(f"{self.describe()} cannot split this model: " + "; ".join(problems))

    def layout(self, args: ModelArgs, rank: int) -> RankLayout:
        """What ``rank`` holds of a model with ``args``."""
        self.check_model(args)
        n = self.tensor_parallel_size
        if not 0 <= rank < n:
            raise ParallelConfigError(f"rank {rank} is outside the group of {n}")
        h = args.n_heads // n
        if n <= args.n_kv_heads:
            kv = args.n_kv_heads // n
            kv_start = rank * kv
        else:  # each KV head on n / n_kv_heads consecutive ranks: those whose query heads read it
            kv = 1
            kv_start = rank // (n // args.n_kv_heads)
        ep_rank, moe_tp_rank = divmod(rank, self.moe_tp_size)
        e = args.num_experts // self.ep_size
        f = args.hidden_dim // self.moe_tp_size
        return RankLayout(rank=rank, world_size=n, heads=(rank * h, rank * h + h), kv_heads=(kv_start, kv_start + kv),
                          experts=(ep_rank * e, ep_rank * e + e), ffn=(moe_tp_rank * f, moe_tp_rank * f + f),
                          ep_rank=ep_rank, ep_size=self.ep_size)


@dataclass(frozen=True)
class RankLayout:
    """One rank's share, as [start, stop) ranges of the full model's query heads, KV heads, experts and each
    expert's FFN width. Example, TP 2 x EP 2 on Mixtral-8x7B, rank 3: heads (24, 32), kv_heads (6, 8),
    experts (4, 8), ffn (7168, 14336)."""

    rank: int
    world_size: int
    heads: tuple[int, int]
    kv_heads: tuple[int, int]
    experts: tuple[int, int]
    ffn: tuple[int, int]
    ep_rank: int = 0
    ep_size: int = 1

    def shard_args(self, args: ModelArgs) -> ModelArgs:
        """The rank's model: its own query/KV head counts and FFN width; the router still sees every expert."""
        return args.replace(n_heads=self.heads[1] - self.heads[0], n_kv_heads=self.kv_heads[1] - self.kv_heads[0],
                            hidden_dim=self.ffn[1] - self.ffn[0])

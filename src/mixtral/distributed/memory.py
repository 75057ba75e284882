"""What one rank holds of a model under a parallel layout: parameters, weight bytes, KV bytes per token.

Counted from the rank's shard built on the meta device (no memory), so it is exact for every layout, replicated
parts (embeddings, lm_head, norms, routers) included. ``mixtral info --tensor-parallel-size N`` prints it.
"""

from __future__ import annotations

from typing import Any

from mixtral.distributed.config import ParallelConfig
from mixtral.distributed.sharded_loader import shard_parameters
from mixtral.model.args import ModelArgs

# Bytes per weight of each storage type (as `mixtral info`; int4 ignores its small per-group scales).
WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp8": 1.0, "int4": 0.5}


def rank_memory(args: ModelArgs, parallel: ParallelConfig) -> dict[str, Any]:
    """The largest share any rank holds (every rank holds the same amount in these layouts)."""
    params = max(shard_parameters(args, parallel, r) for r in range(parallel.world_size))
    shard = parallel.layout(args, 0).shard_args(args)
    replicated = 2 * args.vocab_size * args.dim + args.n_layers * (args.num_experts * args.dim + 2 * args.dim)
    return {
        "layout": parallel.describe(),
        "ranks": parallel.world_size,
        "parameters": params,
        "replicated_parameters": replicated + args.dim,
        "weight_bytes": {k: int(params * b) for k, b in WEIGHT_BYTES.items()},
        "kv_bytes_per_token": {"bf16": shard.kv_bytes_per_token(2), "fp8": shard.kv_bytes_per_token(1)},
    }

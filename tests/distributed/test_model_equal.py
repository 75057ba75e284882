"""One model over several CPU processes (gloo) gives the logits of one process: TP 2, EP 2, TP 2 x EP 2.

The reference is the single-process model loaded from the same checkpoint; fp32, so the only differences are
the order of the partial sums (well under 1e-5). TP 2 x EP 2 runs attention over 4 ranks while the tiny model
has 2 KV heads: each KV head is replicated on 2 ranks.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mixtral.checkpoint.loader import load_model
from mixtral.distributed.executor import DistributedExecutor


def test_logits_equal_single_process(executor: DistributedExecutor, tiny_hf_checkpoint: Path) -> None:
    full = load_model(str(tiny_hf_checkpoint))
    ids = torch.randint(10, full.args.vocab_size, (3, 19), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        want = full(ids)  # [B, T, V]
    got = executor.forward(ids)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-5
    # The shards really are shards: rank 0 holds half (or a quarter) of the attention and of the experts.
    layer = executor.model.layers[0]
    n = executor.parallel.world_size
    assert layer.attention.wqkv.weight.shape[0] < full.layers[0].attention.wqkv.weight.shape[0]
    assert layer.feed_forward.w13.numel() * n == full.layers[0].feed_forward.w13.numel()


def test_every_rank_computes_the_same_routing(executor: DistributedExecutor) -> None:
    """The all-reduce hands every rank the same sums, so a second forward is bitwise the first (no drift from
    ranks routing a token differently)."""
    ids = torch.randint(10, 32768, (2, 11), generator=torch.Generator().manual_seed(9))
    assert torch.equal(executor.forward(ids), executor.forward(ids))

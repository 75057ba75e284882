"""The CPU-checkable parts of the CUDA-graph decode path: the batch ladder and masked routing counts.

(Capture and replay themselves need a GPU: tests/gpu/test_gpu_engine.py runs them against eager execution.)
"""

from __future__ import annotations

import torch

from mixtral.engine.cuda_graphs import batch_ladder
from mixtral.kernels.reference import count_choices
from mixtral.model.context import routing_counter


def record_routing(ctx: object, layer: int, ids: torch.Tensor) -> None:
    """Count ``ids`` [N, k] as the model's router fallback does: the context's row [E] and its row mask."""
    counts, mask = routing_counter(ctx, layer)
    assert counts is not None
    count_choices(counts, ids, mask)


def test_batch_ladder_covers_every_batch_size() -> None:
    assert batch_ladder(1) == [1]
    assert batch_ladder(40) == [1, 2, 4, 8, 16, 24, 32, 40]
    ladder = batch_ladder(256)
    assert ladder[:7] == [1, 2, 4, 8, 16, 24, 32] and ladder[-1] == 256
    for n in range(1, 257):  # every batch has a graph, padded by at most a third of its size (or 16 rows)
        b = min(x for x in ladder if x >= n)
        assert b - n <= max(16, n // 3)


class _Ctx:
    def __init__(self, layers: int, experts: int, mask: torch.Tensor | None) -> None:
        self.expert_counts = torch.zeros(layers, experts, dtype=torch.int64)
        self.routing_mask = mask


def test_routing_mask_leaves_padding_rows_out_of_the_counts() -> None:
    ids = torch.tensor([[0, 3], [1, 3], [2, 0]])  # [N=3, k=2]
    full = _Ctx(1, 4, None)
    record_routing(full, 0, ids)
    assert full.expert_counts[0].tolist() == [2, 1, 1, 2]
    masked = _Ctx(1, 4, torch.tensor([1, 1, 0]))  # the third row is padding
    record_routing(masked, 0, ids)
    assert masked.expert_counts[0].tolist() == [1, 1, 0, 2]

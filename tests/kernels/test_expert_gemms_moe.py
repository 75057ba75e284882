"""The per-expert cuBLAS MoE path (kernels/expert_gemms_moe.py) against moe_reference on CPU, expert-parallel
slices included, and ops.fused_moe's choice of it for large eager batches."""

from __future__ import annotations

import pytest
import torch

from mixtral.kernels import expert_gemms_moe as egm
from mixtral.kernels import ops
from mixtral.kernels.reference import moe_reference, route_topk


def _inputs(n: int, d: int, f: int, e: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    w13 = torch.randn(e, 2 * f, d, generator=gen) * d**-0.5
    w2 = torch.randn(e, d, f, generator=gen) * f**-0.5
    weights, ids = route_topk(torch.randn(n, e, generator=gen), 2)
    return x, w13, w2, weights, ids


@pytest.mark.parametrize(("n", "d", "f", "e"), [(1, 16, 24, 8), (37, 48, 40, 6), (200, 32, 64, 8)])
def test_matches_reference(n: int, d: int, f: int, e: int) -> None:
    x, w13, w2, weights, ids = _inputs(n, d, f, e, seed=n)
    out = egm.expert_gemms_moe(x, w13, w2, weights, ids)
    torch.testing.assert_close(out, moe_reference(x, w13, w2, weights, ids), rtol=1e-5, atol=1e-5)


def test_expert_parallel_slices_sum_to_the_whole() -> None:
    x, w13, w2, weights, ids = _inputs(50, 32, 48, 8, seed=5)
    parts = [egm.expert_gemms_moe(x, w13[s:s + 2], w2[s:s + 2], weights, ids, expert_start=s) for s in (0, 2, 4, 6)]
    torch.testing.assert_close(sum(parts), moe_reference(x, w13, w2, weights, ids), rtol=1e-5, atol=1e-5)
    # An expert nobody chose and an empty batch.
    only0 = torch.zeros_like(ids)
    torch.testing.assert_close(egm.expert_gemms_moe(x, w13, w2, weights, only0),
                               moe_reference(x, w13, w2, weights, only0), rtol=1e-5, atol=1e-5)
    assert egm.expert_gemms_moe(x[:0], w13, w2, weights[:0], ids[:0]).shape == (0, 32)


def test_fused_moe_takes_it_for_large_eager_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = egm.expert_gemms_moe
    monkeypatch.setattr(ops, "use_triton", lambda t: True)
    monkeypatch.setattr(ops, "GROUPED_MM_MIN_TOKENS", 40)
    monkeypatch.setenv("MIXTRAL_MOE_PREFILL", "expert_gemms")
    monkeypatch.setattr(egm, "expert_gemms_moe", lambda x, *a: calls.append(x.shape[0]) or original(x, *a))
    x, w13, w2, weights, ids = _inputs(48, 32, 48, 8, seed=9)
    out = ops.fused_moe(x, w13, w2, weights, ids)
    torch.testing.assert_close(out, moe_reference(x, w13, w2, weights, ids), rtol=1e-5, atol=1e-5)
    assert calls == [48]

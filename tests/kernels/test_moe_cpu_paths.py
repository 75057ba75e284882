"""The one-token experts (kernels/moe_grouped.py ``_one_token``, batch-1 decode) against the reference and the
sorted form, bitwise in bf16 (same products, same order of the sums), with expert parallelism and autograd; and the
packed int experts (quant/int_cpu.py) through the same grouping."""

from __future__ import annotations

import pytest
import torch

from mixtral.kernels import moe_grouped as mg
from mixtral.kernels.reference import moe_reference, route_topk
from mixtral.quant.int_cpu import cpu_moe, is_packed, prepare_cpu
from mixtral.quant.int_layout import IntFormat, quantize_rtn
from mixtral.quant.int_method import reference_moe


def _problem(n: int, e: int = 8, d: int = 32, f: int = 48, k: int = 2, seed: int = 0,
             dtype: torch.dtype = torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    w13 = (torch.randn(e, 2 * f, d, generator=g) * 0.2).to(dtype)
    w2 = (torch.randn(e, d, f, generator=g) * 0.2).to(dtype)
    weights, ids = route_topk(torch.randn(n, e, generator=g), k)
    return x, w13, w2, weights, ids


def _ffn(w13: torch.Tensor, w2: torch.Tensor):
    def ffn(e: int, rows: torch.Tensor) -> torch.Tensor:
        gate, up = torch.nn.functional.linear(rows, w13[e]).chunk(2, dim=-1)
        return torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, w2[e])

    return ffn


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 2, 3])
def test_one_token_is_bitwise_the_reference(seed: int, k: int) -> None:
    x, w13, w2, weights, ids = _problem(1, k=k, seed=seed)
    want = moe_reference(x, w13, w2, weights, ids, 0)
    got = mg.moe_grouped(x, w13, w2, weights, ids, 0)
    assert want.abs().max() > 0.05 and torch.equal(got, want)
    torch.testing.assert_close(got, mg._sorted(x, weights, ids, 0, 8, _ffn(w13, w2)), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_one_token_expert_parallel_shards(ranks: int) -> None:
    x, w13, w2, weights, ids = _problem(1, seed=ranks, dtype=torch.float32)
    full = moe_reference(x, w13, w2, weights, ids, 0)
    e_local = 8 // ranks
    parts = [mg.moe_grouped(x, w13[r * e_local:(r + 1) * e_local], w2[r * e_local:(r + 1) * e_local], weights, ids,
                            r * e_local) for r in range(ranks)]
    torch.testing.assert_close(sum(parts), full, rtol=1e-5, atol=1e-5)


def test_one_token_backpropagates_like_the_reference() -> None:
    grads = []
    for fn in (moe_reference, mg.moe_grouped):
        x, w13, w2, weights, ids = _problem(1, seed=9, dtype=torch.float32)
        leaves = [t.requires_grad_() for t in (x, w13, w2)]
        fn(x, w13, w2, weights, ids, 0).square().sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", [IntFormat(4, 32), IntFormat(8, 32), IntFormat(8, 0)],
                         ids=["int4-g32", "int8-g32", "int8-channel"])
@pytest.mark.parametrize("n", [1, 16, 40])  # 40 tokens x 2: the sorted form
def test_packed_int_experts_match_the_reference(fmt: IntFormat, n: int) -> None:
    """Q4_0-, Q8_0- and per-channel-shaped int experts, packed for bf16, against dequantize-then-reference."""
    x, w13, w2, weights, ids = _problem(n, d=64, f=64, seed=n, dtype=torch.float32)
    q13, q2 = quantize_rtn(w13, fmt), quantize_rtn(w2, fmt)
    want = reference_moe(x.bfloat16(), q13, q2, weights, ids).float()
    p13, p2 = prepare_cpu(q13, torch.bfloat16), prepare_cpu(q2, torch.bfloat16)
    assert is_packed(p13) and is_packed(p2)
    got = cpu_moe(x.bfloat16(), p13, p2, weights, ids).float()
    assert ((got - want).abs().max() / want.abs().max()).item() < 2e-2

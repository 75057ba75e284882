"""The FP8 MoE paths (kernels/triton/fp8_fused_moe.py for decode, fp8_sorted_moe.py for prefill) against
``quant.fp8.qmoe_reference`` on CPU through Triton's interpreter: both row layouts, split-K, expert
parallelism, static input scales, TMA and pointer loads; and the quantized computation against the bf16
experts it stands for."""

from __future__ import annotations

import pytest
import torch

from mixtral.kernels.reference import moe_reference, route_topk
from mixtral.kernels.triton import fp8_fused_moe as ffm
from mixtral.kernels.triton import fp8_sorted_moe as fsm
from mixtral.kernels.triton import moe_configs as mc
from mixtral.quant import fp8 as q

DECODE = mc.MoEConfig(16, mc.GemmConfig(32, 32, 4, 2), mc.GemmConfig(32, 32, 4, 2))
SPLIT = mc.MoEConfig(16, mc.GemmConfig(32, 32, 4, 2), mc.GemmConfig(32, 32, 4, 2, split_k=2))
PREFILL = mc.MoEConfig(16, mc.GemmConfig(32, 32, 4, 2), mc.GemmConfig(32, 32, 4, 2))
PREFILL_SHORT = mc.MoEConfig(32, mc.GemmConfig(32, 64, 4, 2), mc.GemmConfig(32, 32, 4, 2), small_m=16)


def _problem(n: int, e: int, d: int, f: int, k: int, seed: int, dtype: torch.dtype = torch.float32,
             num_global: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen).to(dtype)
    w13 = torch.randn(e, 2 * f, d, generator=gen) / d**0.5  # [E, 2F, D]
    w2 = torch.randn(e, d, f, generator=gen) / f**0.5  # [E, D, F]
    weights, ids = route_topk(torch.randn(n, num_global or e, generator=gen), k)
    method = q.Fp8Method()
    return x, method.quantize(w13), method.quantize(w2), weights, ids, (w13, w2)


def _run(path, x, t13, t2, weights, ids, expert_start=0, **kw):
    return path(x, t13["weight"], t13["weight_scale"], t2["weight"], t2["weight_scale"], weights, ids, expert_start,
                t13.get("input_scale"), t2.get("input_scale"), **kw)


@pytest.mark.parametrize(("n", "direct", "config"), [
    (1, None, DECODE),  # one token: the align-free layout
    (3, False, SPLIT),  # aligned layout, split-K w2
    (9, None, DECODE),  # more pairs than a block: aligned
])
def test_decode_kernel_matches_the_quantized_reference(n: int, direct: bool | None, config: mc.MoEConfig) -> None:
    x, t13, t2, weights, ids, _ = _problem(n, 4, 64, 96, 2, seed=n)
    got = _run(ffm.fp8_fused_moe, x, t13, t2, weights, ids, config=config, direct=direct)
    torch.testing.assert_close(got, q.qmoe_reference(x, t13, t2, weights, ids), rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize(("n", "e", "d", "f", "k", "config", "use_tma"), [
    (37, 4, 64, 96, 2, PREFILL, True),  # groups end mid-tile
    (37, 4, 64, 96, 2, PREFILL, False),  # pointer loads
    (70, 8, 64, 128, 3, PREFILL_SHORT, True),  # short last blocks in 16-row tiles
])
def test_prefill_kernel_matches_the_quantized_reference(n, e, d, f, k, config, use_tma) -> None:
    x, t13, t2, weights, ids, _ = _problem(n, e, d, f, k, seed=e + k)
    got = _run(fsm.fp8_sorted_moe, x, t13, t2, weights, ids, config=config, use_tma=use_tma)
    torch.testing.assert_close(got, q.qmoe_reference(x, t13, t2, weights, ids), rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_expert_parallel_rank_and_static_scales(path: str) -> None:
    """Rank 1 of 2 holds experts 4..7: pairs of experts 0..3 add nothing; static input scales quantize every
    row with the one scale."""
    x, t13, t2, weights, ids, _ = _problem(12, 4, 64, 64, 2, seed=5, num_global=8)
    t13 = {**t13, "input_scale": torch.tensor([0.02])}
    t2 = {**t2, "input_scale": torch.tensor([0.005])}
    want = q.qmoe_reference(x, t13, t2, weights, ids, expert_start=4)
    if path == "decode":
        got = _run(ffm.fp8_fused_moe, x, t13, t2, weights, ids, 4, config=DECODE)
    else:
        got = _run(fsm.fp8_sorted_moe, x, t13, t2, weights, ids, 4, config=PREFILL, use_tma=True)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-5)
    assert want.abs().sum() > 0 and torch.all(want[(ids < 4).all(dim=1)] == 0)


def test_fp16_activations() -> None:
    x, t13, t2, weights, ids, _ = _problem(5, 4, 64, 64, 2, seed=7, dtype=torch.float16)
    want = q.qmoe_reference(x, t13, t2, weights, ids)
    for got in (_run(ffm.fp8_fused_moe, x, t13, t2, weights, ids, config=DECODE),
                _run(fsm.fp8_sorted_moe, x, t13, t2, weights, ids, config=PREFILL, use_tma=True)):
        assert got.dtype == torch.float16
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


def test_quantized_experts_stay_near_the_unquantized_ones() -> None:
    x, t13, t2, weights, ids, (w13, w2) = _problem(16, 4, 128, 256, 2, seed=11)
    got = _run(ffm.fp8_fused_moe, x, t13, t2, weights, ids, config=DECODE)
    exact = moe_reference(x, w13, w2, weights, ids)
    rel = ((got - exact).norm() / exact.norm()).item()
    assert rel < 0.08, rel


def test_refusals() -> None:
    x, t13, t2, weights, ids, _ = _problem(4, 4, 64, 96, 2, seed=1)
    with pytest.raises(ValueError, match="joint"):
        joint = mc.MoEConfig(16, mc.GemmConfig(32, 32, joint=True), mc.GemmConfig(32, 32))
        _run(fsm.fp8_sorted_moe, x, t13, t2, weights, ids, config=joint, use_tma=True)
    with pytest.raises(ValueError, match="F=96 is not a multiple"):
        _run(fsm.fp8_sorted_moe, x, t13, t2, weights, ids, config=mc.MoEConfig(16, mc.GemmConfig(64, 32),
                                                                              mc.GemmConfig(32, 32)))
    with pytest.raises(ValueError, match="fp8_fused_moe"):
        ffm.fp8_fused_moe(x, t13["weight"].float(), t13["weight_scale"], t2["weight"], t2["weight_scale"], weights,
                          ids)

"""FP8 activation quantization and the dense FP8 GEMM (kernels/triton/fp8_quant.py, fp8_gemm.py) against
quant/fp8.py's PyTorch numerics, on CPU through Triton's interpreter."""

from __future__ import annotations

import pytest
import torch

from mixtral.kernels.triton import fp8_gemm, fp8_quant
from mixtral.quant import fp8 as q


def _x(m: int, k: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-3, 2, m)[:, None]  # rows of very different sizes
    return x.to(dtype)


@pytest.mark.parametrize(("m", "k"), [(5, 300), (3, 64), (2, 5000)])
def test_quantize_rows_equals_pytorch(m: int, k: int) -> None:
    x = _x(m, k, seed=m)
    x[0, :] = 0.0  # a padding row: the floor scale, zero codes
    if k > 64:
        x[1, 7] = 31.6 * x[1].abs().max() / 448 * 14.17  # values that round up into the next power of two
    codes, scales = fp8_quant.quantize_rows(x)
    ref_codes, ref_scales = q.quantize_rows(x)
    assert torch.equal(scales, ref_scales)
    assert torch.equal(codes.float(), ref_codes.float())  # exact e4m3 codes (ties to even, saturation)


def test_rounding_of_every_e4m3_boundary() -> None:
    """Values just above, at and below every midpoint between neighbouring e4m3 codes round as PyTorch does
    (the interpreter's own conversion gets the carries wrong; ``round_e4m3`` must not)."""
    grid = torch.arange(0, 127, dtype=torch.uint8).view(q.FP8).float()  # every finite non-negative code
    mids = (grid[1:] + grid[:-1]) / 2
    vals = torch.cat([mids, torch.nextafter(mids, torch.zeros(1)), torch.nextafter(mids, torch.full((1,), 1e4)),
                      grid, torch.tensor([448.0, 500.0])])
    vals = torch.cat([vals, -vals])[None, :]
    codes, _ = fp8_quant.quantize_rows(vals, static_scale=torch.ones(1))
    torch.testing.assert_close(codes.float(), q.to_fp8(vals, torch.ones(1)).float(), rtol=0, atol=0)


def test_static_scale() -> None:
    x = _x(4, 96, seed=3)
    scale = torch.tensor([0.05])
    codes, scales = fp8_quant.quantize_rows(x, scale)
    ref_codes, ref_scales = q.quantize_rows(x, scale)
    assert torch.equal(scales, ref_scales) and torch.equal(codes.float(), ref_codes.float())


@pytest.mark.parametrize(("m", "n", "k", "config"), [
    (1, 48, 64, (16, 32, 32, 4, 2, 1)),  # decode-shaped: a ragged last column tile
    (7, 64, 96, None),  # the default decode tile, K not a multiple of the tile
    (40, 72, 64, (16, 32, 32, 4, 2, 2)),  # several row tiles in groups of two
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_matches_the_quantized_reference(m: int, n: int, k: int, config: tuple | None,
                                                dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(n)
    w = torch.randn(n, k, generator=gen) / k**0.5
    t = q.Fp8Method().quantize(w)
    x = _x(m, k, seed=k, dtype=dtype)
    got = fp8_gemm.fp8_linear(x, t["weight"], t["weight_scale"], config=config)
    want = q.qlinear_reference(x, t)
    assert got.dtype == dtype
    # Same codes, same products; only the fp32 summation order differs.
    torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 2e-3, atol=1e-6)
    # And the quantized computation stays near the unquantized one (fp8: 3 mantissa bits per operand).
    exact = x.float() @ w.T
    rel = ((got.float() - exact).norm() / exact.norm()).item()
    assert rel < 0.06, rel


def test_linear_static_input_scale() -> None:
    w = torch.randn(32, 64) / 8
    t = {**q.Fp8Method().quantize(w), "input_scale": torch.tensor([0.02])}
    x = torch.randn(3, 64)
    got = fp8_gemm.fp8_linear(x, t["weight"], t["weight_scale"], t["input_scale"], config=(16, 32, 32, 4, 2, 1))
    torch.testing.assert_close(got, q.qlinear_reference(x, t), rtol=1e-5, atol=1e-6)


def test_gemm_refuses_mismatched_operands() -> None:
    a = torch.zeros(2, 32, dtype=q.FP8)
    with pytest.raises(ValueError, match="fp8_gemm"):
        fp8_gemm.fp8_gemm(a, torch.ones(2), torch.zeros(8, 16, dtype=q.FP8), torch.ones(8), torch.float32)

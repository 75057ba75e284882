"""quant/fp8.py: the fp8 method's stored layout, quantization error bounds, row independence (what loading
piece by piece and tensor-parallel slicing rely on), the per-token activation semantics and its references."""

from __future__ import annotations

import pytest
import torch

from mixtral.kernels.reference import moe_reference, route_topk
from mixtral.quant import QuantSpec, get_method
from mixtral.quant import fp8 as q


def test_stored_layout_matches_what_quantize_returns() -> None:
    method = get_method(QuantSpec("fp8"))
    assert isinstance(method, q.Fp8Method)
    assert [(s.name, s.dtype, s.out_block, s.in_block) for s in method.stored()] == [
        ("weight", q.FP8, 1, 1), ("weight_scale", torch.float32, 1, 0)]
    t = method.quantize(torch.randn(3, 40, 24))  # [E, out, in]
    for s in method.stored():
        assert tuple(t[s.name].shape) == s.shape((3,), 40, 24) and t[s.name].dtype == s.dtype
    static = q.Fp8Method(QuantSpec("fp8", source="compressed-tensors", static_input_scale=True))
    assert static.stored()[-1].name == "input_scale" and static.stored()[-1].shape((8,), 4, 4) == (8,)
    with pytest.raises(ValueError, match="static FP8 input scales come from a calibrated checkpoint"):
        static.quantize(torch.randn(4, 4))
    with pytest.raises(ValueError, match="'int4'"):
        q.Fp8Method(QuantSpec("int4"))


def test_weight_bytes_of_an_8x7b_expert_stack() -> None:
    e, f, d = 8, 14336, 4096
    assert q.Fp8Method().weight_bytes((e,), 2 * f, d) == e * 2 * f * d + e * 2 * f * 4  # codes + fp32 scales


def test_quantization_error_is_half_a_step() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=gen) * torch.logspace(-4, 1, 64)[:, None]
    w[5] = 0.0  # an all-zero row: the floor scale, exact zeros, no NaN
    method = q.Fp8Method()
    t = method.quantize(w)
    deq = method.dequantize(t, torch.float32)
    scale = t["weight_scale"][:, None]
    # e4m3 keeps 3 mantissa bits: half a step is 2^-4 of the value, 2^-10 of the scale among subnormals.
    bound = torch.maximum(w.abs() * 2**-4, scale * 2**-10) * (1 + 1e-6)
    assert torch.all((deq - w).abs() <= bound)
    assert torch.all(deq[5] == 0) and torch.isfinite(deq).all()
    assert torch.allclose(t["weight_scale"], w.abs().amax(dim=1).clamp(min=q.AMAX_FLOOR) / 448)
    assert torch.all(t["weight"].float().abs().amax(dim=1)[torch.arange(64) != 5] == 448)  # full range used


def test_rows_quantize_independently() -> None:
    """Quantizing a block of rows equals slicing the quantized whole: q/k/v loaded piece by piece and a tensor-
    parallel rank's rows are the same codes and scales as the fused weight's."""
    w = torch.randn(4, 96, 32)
    method = q.Fp8Method()
    whole = method.quantize(w)
    part = method.quantize(w[:, 40:72])
    for s in method.stored():
        assert torch.equal(s.rows(whole[s.name], 40, 72).float(), part[s.name].float())
    cols = method.stored()[0].cols(whole["weight"], 8, 24)
    assert cols.shape == (4, 96, 16)


def test_activations_are_quantized_per_token() -> None:
    """A token's output does not depend on the other tokens of the batch (per-token scales), and the CPU
    ``linear`` is the quantized reference."""
    gen = torch.Generator().manual_seed(1)
    method = q.Fp8Method()
    t = method.quantize(torch.randn(48, 64, generator=gen) / 8)
    x = torch.randn(5, 64, generator=gen)
    x[3] *= 1000  # a loud token must not change its neighbours' scales
    batched = method.linear(x, t)
    alone = torch.cat([method.linear(x[i:i + 1], t) for i in range(5)])
    torch.testing.assert_close(batched, alone, rtol=1e-6, atol=1e-6)  # same codes, same scales; fp32 sum order
    rows = [q.quantize_rows(x[i:i + 1]) for i in range(5)]
    assert torch.equal(q.quantize_rows(x)[0].float(), torch.cat([c for c, _ in rows]).float())
    assert torch.equal(batched, q.qlinear_reference(x, t))
    _, scales = q.quantize_rows(x)
    assert torch.allclose(scales, x.abs().amax(dim=1) / 448)
    static_codes, static_scales = q.quantize_rows(x, torch.tensor([0.01]))
    assert torch.all(static_scales == 0.01) and static_codes.float().abs().max() == 448  # saturated, finite


def test_bf16_activations_round_once() -> None:
    method = q.Fp8Method()
    w = torch.randn(32, 64)
    t = method.quantize(w)
    x = torch.randn(3, 64).to(torch.bfloat16)
    got = method.linear(x, t)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, q.scaled_mm(*q.quantize_rows(x), t["weight"], t["weight_scale"]).to(torch.bfloat16))


def test_moe_reference_matches_the_experts_it_stands_for() -> None:
    gen = torch.Generator().manual_seed(2)
    e, d, f, n = 4, 64, 96, 12
    w13, w2 = torch.randn(e, 2 * f, d, generator=gen) / 8, torch.randn(e, d, f, generator=gen) / 10
    x = torch.randn(n, d, generator=gen)
    weights, ids = route_topk(torch.randn(n, e, generator=gen), 2)
    method = q.Fp8Method()
    t13, t2 = method.quantize(w13), method.quantize(w2)
    got = method.moe(x, t13, t2, weights, ids)  # CPU: the reference
    assert torch.equal(got, q.qmoe_reference(x, t13, t2, weights, ids))
    exact = moe_reference(x, w13, w2, weights, ids)
    assert ((got - exact).norm() / exact.norm()).item() < 0.09
    # the weights-only reference (dequantize, then the fp32 experts) is closer still: no activation rounding
    deq = moe_reference(x, method.dequantize(t13, torch.float32), method.dequantize(t2, torch.float32), weights, ids)
    assert ((deq - exact).norm() / exact.norm()).item() < ((got - exact).norm() / exact.norm()).item()
    # expert parallel: rank 1 of 2 holds experts 2..3 and adds nothing for the others
    half = {k: v[2:] for k, v in t13.items()}, {k: v[2:] for k, v in t2.items()}
    part = q.qmoe_reference(x, *half, weights, ids, expert_start=2)
    assert torch.all(part[(ids < 2).all(dim=1)] == 0)


def test_static_input_scales_take_the_largest_piece() -> None:
    method = q.Fp8Method(QuantSpec("fp8", source="autofp8", static_input_scale=True))
    t = {**q.Fp8Method().quantize(torch.randn(3, 8, 16)), "input_scale": torch.tensor([0.1, 0.4, 0.2])}
    processed = method.process_after_loading(t)
    assert processed["input_scale"].tolist() == [pytest.approx(0.4)]
    x = torch.randn(2, 16)
    expert0 = {k: v[0] for k, v in processed.items() if k != "input_scale"}
    out = q.qlinear_reference(x, {**expert0, "input_scale": processed["input_scale"]})
    codes, _ = q.quantize_rows(x, processed["input_scale"])
    assert torch.equal(out, q.scaled_mm(codes, torch.full((2,), 0.4), expert0["weight"],
                                        expert0["weight_scale"]).to(x.dtype))

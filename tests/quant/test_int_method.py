"""Int4Method / Int8Method: construction from a QuantSpec, and the CPU paths held to the reference."""

from __future__ import annotations

import pytest
import torch

from mixtral.kernels.reference import route_topk
from mixtral.quant import QuantSpec, get_method, int_cpu
from mixtral.quant.int_layout import IntFormat, dequantize, quantize_rtn
from mixtral.quant.int_method import int4_group_for, method_for_format, reference_linear, reference_moe

CPU_FORMATS = [
    IntFormat(4, 128, torch.float16, "none"),
    IntFormat(4, 32, torch.float16, "int"),
    IntFormat(4, 0, torch.float16, "int"),
    IntFormat(4, 32, torch.float32, "float"),  # GGUF Q4_K
    IntFormat(8, 0, torch.float16, "none"),
    IntFormat(8, 32, torch.float16, "none"),  # GGUF Q8_0
    IntFormat(8, 64, torch.bfloat16, "int"),
    IntFormat(8, 32, torch.float32, "float"),  # GGUF Q5_K
]


def _stored(fmt: IntFormat, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Stored tensors of ``fmt`` for w: RTN where it applies, else codes/scales/offsets drawn at random."""
    if fmt.zero != "float":
        return quantize_rtn(w, fmt)
    *lead, n, k = w.shape
    shape = (*lead, n, k // fmt.group_size)
    codes = torch.randint(0, 16 if fmt.bits == 4 else 32, (*lead, n, k), dtype=torch.uint8)
    from mixtral.quant.int_layout import pack_int4

    return {"qweight": pack_int4(codes) if fmt.bits == 4 else codes.to(torch.int8),
            "scales": (torch.rand(shape) * 0.01 + 1e-3).to(fmt.scale_dtype),
            "offsets": (-torch.rand(shape) * 0.05).to(fmt.scale_dtype)}


def test_get_method_defaults() -> None:
    m4 = get_method(QuantSpec("int4"))
    assert m4.format == IntFormat(4, 128, torch.float16, "none")
    assert [s.name for s in m4.stored()] == ["qweight", "scales"]
    m8 = get_method(QuantSpec("int8"))
    assert m8.format == IntFormat(8, 0, torch.float16, "none")
    awq = get_method(QuantSpec("int4", "awq", group_size=128, symmetric=False))
    assert [s.name for s in awq.stored()] == ["qweight", "scales", "zeros"]
    gptq = get_method(QuantSpec("int4", "gptq", group_size=128, act_order=True, scale_dtype=torch.bfloat16))
    assert [s.name for s in gptq.stored()] == ["qweight", "scales", "perm"]
    assert gptq.format.scale_dtype == torch.bfloat16
    # 4096 x 14336 int4 g128 (8x7B w2 of one expert): codes 29.4 MB + fp16 scales 0.9 MB.
    assert m4.weight_bytes((), 4096, 14336) == 4096 * 7168 + 4096 * 112 * 2
    with pytest.raises(ValueError, match="cannot come from 'fp8-ish'"):
        get_method(QuantSpec("int4", "fp8-ish"))
    assert int4_group_for((4096, 14336, 4096)) == 128  # 8x7B
    assert int4_group_for((192, 320, 192)) == 64  # the demo model
    with pytest.raises(ValueError, match="divides the input widths"):
        int4_group_for((100, 50))


@pytest.mark.parametrize("kernel", ["packed", pytest.param("native", marks=pytest.mark.native_cpu)])
@pytest.mark.parametrize("fmt", CPU_FORMATS, ids=str)
def test_cpu_packed_linear_matches_reference(fmt: IntFormat, kernel: str) -> None:
    """The packed path's error against the fp32 truth stays within twice the reference's own (bf16) error; the
    native kernel's (int8 activations) within 1.5% of the product's norm."""
    torch.manual_seed(0)
    method = method_for_format(fmt)
    w = torch.randn(64, 256) * 0.05
    t = _stored(fmt, w)
    packed = method.process_after_loading(t, torch.bfloat16, kernel)
    assert int_cpu.is_packed(packed)
    assert any(k in packed for k in ("cpu_n4", "cpu_n8")) == (kernel == "native")
    for m in (1, 5, 33):
        x = torch.randn(m, 256, dtype=torch.bfloat16)
        truth = x.float() @ dequantize(t, torch.float32).T
        ref = reference_linear(x, t).float()
        fast = method.linear(x, packed)
        assert fast.dtype == torch.bfloat16 and fast.shape == (m, 64)
        ref_err = (ref - truth).abs().max().item()
        fast_err = (fast.float() - truth).abs().max().item()
        if kernel == "native":
            assert float((fast.float() - truth).norm() / truth.norm()) < 0.015, (m, fast_err)
            continue
        assert fast_err <= 2 * ref_err + 1e-3 * truth.abs().max().item(), (m, fast_err, ref_err)


def test_cpu_without_packed_kernel_uses_reference_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 activations, groups of 16 (GGUF Q6_K) and no act_dtype keep the canonical tensors: the result is the
    reference's, also when the fallback dequantizes in blocks of rows."""
    torch.manual_seed(0)
    q6k = IntFormat(8, 16, torch.float32, "none")
    method = method_for_format(q6k)
    t = quantize_rtn(torch.randn(48, 64), q6k)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    for act in (torch.bfloat16, None):  # the packed kernels (the native one takes groups of 16)
        kept = method.process_after_loading(t, act, "packed")
        assert not int_cpu.is_packed(kept)
        assert torch.equal(method.linear(x, kept), reference_linear(x, t))
    monkeypatch.setattr(int_cpu, "_FALLBACK_ROWS", 16)
    assert torch.allclose(int_cpu.reference_linear(x, t).float(), reference_linear(x, t).float(), atol=0, rtol=0)
    m4 = method_for_format(IntFormat(4, 32, torch.float16, "none"))
    t4 = quantize_rtn(torch.randn(48, 64), m4.format)
    assert not int_cpu.is_packed(m4.process_after_loading(t4, torch.float32))  # fp32 activations: no CPU kernel


def test_identity_perm_is_dropped_and_real_perm_kept() -> None:
    fmt = IntFormat(4, 32, torch.float16, "none", act_order=True)
    method = method_for_format(fmt, "gptq")
    t = quantize_rtn(torch.randn(32, 64), IntFormat(4, 32, torch.float16, "none"))
    ident = dict(t, perm=torch.arange(64, dtype=torch.int32))
    assert "perm" not in method.process_after_loading(ident)
    perm = torch.randperm(64).to(torch.int32)
    shuffled = dict(t, perm=perm)
    packed = method.process_after_loading(shuffled, torch.bfloat16)
    assert torch.equal(packed["perm"], perm)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    truth = x.float() @ dequantize(shuffled, torch.float32).T
    assert (method.linear(x, packed).float() - truth).abs().max() < 0.02 * truth.abs().max()


@pytest.mark.parametrize("formats", [
    (IntFormat(4, 32, torch.float16, "int"), IntFormat(4, 64, torch.float16, "int")),
    (IntFormat(4, 32, torch.float32, "float"), IntFormat(8, 16, torch.float32, "none")),  # Q4_K w13, Q6_K w2
], ids=["int4", "q4k+q6k"])
def test_cpu_moe_matches_reference(formats: tuple[IntFormat, IntFormat]) -> None:
    torch.manual_seed(0)
    e, d, f, n = 4, 64, 128, 6
    f13, f2 = formats
    w13 = _stored(f13, torch.randn(e, 2 * f, d) * 0.1)
    w2 = _stored(f2, torch.randn(e, d, f) * 0.1)
    method = method_for_format(f13)
    x = torch.randn(n, d, dtype=torch.bfloat16)
    weights, ids = route_topk(torch.randn(n, 8), 2)
    p13 = method.process_after_loading(w13, torch.bfloat16)
    p2 = method_for_format(f2).process_after_loading(w2, torch.bfloat16)
    for start in (0, 4):  # experts 4..7 live on another rank: only rows routed to 0..3 count here
        truth = reference_moe(x.float(), w13, w2, weights, ids, start)
        ref = reference_moe(x, w13, w2, weights, ids, start).float()
        fast = method.moe(x, p13, p2, weights, ids, start).float()
        ref_err = (ref - truth).abs().max().item()
        assert (fast - truth).abs().max().item() <= 2 * ref_err + 2e-3 * truth.abs().max().item()

"""The CPU paths (quant/int_cpu.py) on GGUF Q8_0 and Q4_0 weights made by gguf's own quantizer: the packed path's
product is held to gguf's dequantization times x, within the reference's (dequantize to bf16, then matmul) own
error, and its large-M form (dequantize the packed weight in blocks, then F.linear) to the reference and the
packed kernel; the native integer-dot kernel's (int8 activations) to the same truth within 1.5% of its norm."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from mixtral.checkpoint.gguf_quants import decode_blocks
from mixtral.kernels.reference import route_topk
from mixtral.quant import int_cpu
from mixtral.quant.int_cpu import cpu_linear, cpu_moe, is_packed, prepare_cpu
from mixtral.quant.int_layout import IntFormat, dequantize, quantize_rtn
from mixtral.quant.int_method import reference_linear, reference_moe


def _gguf_weight(type_name: str, lead: tuple[int, ...], n: int, k: int, seed: int = 0
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(canonical tensors, gguf's fp32 dequantization [*lead, n, k]) of random weights quantized by gguf."""
    w = np.random.default_rng(seed).standard_normal((*lead, n, k)).astype(np.float32) * 0.05
    qtype = gguf.GGMLQuantizationType[type_name]
    raw = gguf.quants.quantize(w, qtype)
    return decode_blocks(type_name, torch.from_numpy(raw), k), torch.from_numpy(gguf.quants.dequantize(raw, qtype))


NATIVE = pytest.param("native", marks=pytest.mark.native_cpu)


@pytest.mark.parametrize("kernel", ["packed", NATIVE])
@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0"])
def test_packed_gguf_linear_is_gguf_dequantize_times_x(type_name: str, kernel: str) -> None:
    t, w = _gguf_weight(type_name, (), 64, 320)
    packed = prepare_cpu(t, torch.bfloat16, kernel)
    assert is_packed(packed) and "qweight" not in packed
    if kernel == "packed":  # Q8_0 is one packed matmul over [hi | lo] nibbles (width 2K), not two summed.
        assert set(packed) == ({"cpu_q8x2", "cpu_sz"} if type_name == "Q8_0" else {"cpu_q4", "cpu_sz"})
    else:
        assert set(packed) == ({"cpu_n8", "cpu_ns"} if type_name == "Q8_0" else {"cpu_n4", "cpu_ns"})
    for m in (1, 4, 16, 33):
        x = torch.randn(m, 320, generator=torch.Generator().manual_seed(m)).bfloat16()
        truth = x.float() @ w.T  # [m, 64]
        ref_err = (reference_linear(x, t).float() - truth).abs().max().item()
        fast = cpu_linear(x, packed)
        assert fast.dtype == torch.bfloat16 and fast.shape == (m, 64)
        fast_err = (fast.float() - truth).abs().max().item()
        if kernel == "native":  # int8 activations in blocks of 32: ~0.5% of the product's norm
            assert float((fast.float() - truth).norm() / truth.norm()) < 0.015, (m, fast_err)
            continue
        # The packed scales are the fp16 ones rounded to bf16 (module docstring): a relative 2^-9 per weight more.
        assert fast_err <= 1.5 * ref_err + 2e-3 * truth.abs().max().item(), (m, fast_err, ref_err)


def test_packed_q8_0_experts_pick_their_own_matrix() -> None:
    """Stacked experts [E, N, K]: expert e's product is that expert's gguf weights times x, not a neighbour's."""
    t, w = _gguf_weight("Q8_0", (3,), 32, 64, seed=5)
    packed = prepare_cpu(t, torch.bfloat16, "packed")
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    for e in range(3):
        truth = x.float() @ w[e].T
        got = cpu_linear(x, packed, e).float()
        assert (got - truth).abs().max() <= 0.02 * truth.abs().max()
        assert (got - x.float() @ w[(e + 1) % 3].T).abs().max() > 0.1 * truth.abs().max()


def test_int4pack_layout_is_the_one_read_back() -> None:
    """The large-M path reads int4 codes straight from PyTorch's packed layout; a PyTorch that packs otherwise
    turns the path off (the packed kernel still runs), and this test says so."""
    assert int_cpu.int4pack_layout_known()


@pytest.mark.parametrize("fmt", [IntFormat(8, 0), IntFormat(8, 32), IntFormat(4, 32), IntFormat(4, 64, zero="int"),
                                 IntFormat(8, 32, zero="int")], ids=str)
def test_large_m_dequantized_path_matches_packed_and_reference(fmt: IntFormat, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    """From LARGE_M rows the packed weight is dequantized in blocks of rows (3 blocks of 64 here) and multiplied
    by F.linear: as close to the fp32 truth as the reference, and to the packed kernel's own product."""
    monkeypatch.setattr(int_cpu, "_DEQUANT_BLOCK", 64 * 128)  # 64-row blocks of a 128-wide weight
    w = torch.randn(192, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    t = quantize_rtn(w, fmt)
    packed = prepare_cpu(t, torch.bfloat16, "packed")
    m = max(int_cpu.LARGE_M.values())
    x = torch.randn(m, 128, generator=torch.Generator().manual_seed(2)).bfloat16()
    truth = x.float() @ dequantize(t, torch.float32).T
    ref_err = (reference_linear(x, t).float() - truth).abs().max().item()
    big = cpu_linear(x, packed)
    monkeypatch.setattr(int_cpu, "LARGE_M", {k: 1 << 40 for k in int_cpu.LARGE_M})
    kernel = cpu_linear(x, packed)  # the packed kernel at the same M
    assert not torch.equal(big, kernel)  # the other path really ran
    scale = truth.abs().max().item()
    assert (big.float() - truth).abs().max().item() <= 1.5 * ref_err + 2e-3 * scale
    assert (big.float() - kernel.float()).abs().max().item() <= 2 * ref_err + 2e-3 * scale


def test_unknown_layout_keeps_the_packed_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    t, _ = _gguf_weight("Q4_0", (), 64, 128)
    packed = prepare_cpu(t, torch.bfloat16, "packed")
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(3)).bfloat16()
    monkeypatch.setattr(int_cpu, "int4pack_layout_known", lambda: False)
    got = cpu_linear(x, packed)
    kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed["cpu_q4"], 32, packed["cpu_sz"])
    assert torch.equal(got, kernel)


def test_large_m_experts_through_cpu_moe(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prefill-sized batch through the grouped experts, the large-M threshold between the experts' row counts
    (87, 69, 87, 77): two experts dequantize, two run the packed kernel, the sum still within the reference's
    error of the fp32 truth (Q8_0 weights from gguf)."""
    monkeypatch.setitem(int_cpu.LARGE_M, "cpu_q8x2", 80)
    e, d, f, n = 4, 64, 128, 160
    t13, _ = _gguf_weight("Q8_0", (e,), 2 * f, d, seed=7)
    t2, _ = _gguf_weight("Q8_0", (e,), d, f, seed=8)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, d, generator=g).bfloat16()
    weights, ids = route_topk(torch.randn(n, e, generator=g), 2)
    assert torch.bincount(ids.flatten(), minlength=e).tolist() == [87, 69, 87, 77]
    truth = reference_moe(x.float(), t13, t2, weights, ids)
    ref_err = (reference_moe(x, t13, t2, weights, ids).float() - truth).abs().max().item()
    got = cpu_moe(x, prepare_cpu(t13, torch.bfloat16, "packed"), prepare_cpu(t2, torch.bfloat16, "packed"), weights,
                  ids).float()
    assert (got - truth).abs().max().item() <= 1.5 * ref_err + 2e-3 * truth.abs().max().item()


@pytest.mark.native_cpu
def test_native_experts_through_cpu_moe() -> None:
    """Prefill- and decode-sized batches through the grouped experts on the native kernel (Q4_0 gate/up, Q8_0
    down, as a mixed GGUF file has): within 1.5% of the fp32 truth's norm, each expert its own weights."""
    e, d, f = 4, 64, 128
    t13, _ = _gguf_weight("Q4_0", (e,), 2 * f, d, seed=9)
    t2, _ = _gguf_weight("Q8_0", (e,), d, f, seed=10)
    p13, p2 = prepare_cpu(t13, torch.bfloat16, "native"), prepare_cpu(t2, torch.bfloat16, "native")
    assert "cpu_n4" in p13 and "cpu_n8" in p2
    g = torch.Generator().manual_seed(6)
    for n in (1, 3, 160):
        x = torch.randn(n, d, generator=g).bfloat16()
        weights, ids = route_topk(torch.randn(n, e, generator=g), 2)
        truth = reference_moe(x.float(), t13, t2, weights, ids)
        got = cpu_moe(x, p13, p2, weights, ids).float()
        assert float((got - truth).norm() / truth.norm()) < 0.015, n

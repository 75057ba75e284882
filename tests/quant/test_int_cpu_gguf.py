"""The CPU packed path (quant/int_cpu.py) on GGUF Q8_0 and Q4_0 weights made by gguf's own quantizer: its product
is held to gguf's dequantization times x, within the reference's (dequantize to bf16, then matmul) own error."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from mixtral.checkpoint.gguf_quants import decode_blocks
from mixtral.quant.int_cpu import cpu_linear, is_packed, prepare_cpu
from mixtral.quant.int_method import reference_linear


def _gguf_weight(type_name: str, lead: tuple[int, ...], n: int, k: int, seed: int = 0
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(canonical tensors, gguf's fp32 dequantization [*lead, n, k]) of random weights quantized by gguf."""
    w = np.random.default_rng(seed).standard_normal((*lead, n, k)).astype(np.float32) * 0.05
    qtype = gguf.GGMLQuantizationType[type_name]
    raw = gguf.quants.quantize(w, qtype)
    return decode_blocks(type_name, torch.from_numpy(raw), k), torch.from_numpy(gguf.quants.dequantize(raw, qtype))


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0"])
def test_packed_gguf_linear_is_gguf_dequantize_times_x(type_name: str) -> None:
    t, w = _gguf_weight(type_name, (), 64, 320)
    packed = prepare_cpu(t, torch.bfloat16)
    assert is_packed(packed) and "qweight" not in packed
    # Q8_0 is one packed matmul over [hi | lo] nibbles (width 2K), not two summed.
    assert set(packed) == ({"cpu_q8x2", "cpu_sz"} if type_name == "Q8_0" else {"cpu_q4", "cpu_sz"})
    for m in (1, 4, 16, 33):
        x = torch.randn(m, 320, generator=torch.Generator().manual_seed(m)).bfloat16()
        truth = x.float() @ w.T  # [m, 64]
        ref_err = (reference_linear(x, t).float() - truth).abs().max().item()
        fast = cpu_linear(x, packed)
        assert fast.dtype == torch.bfloat16 and fast.shape == (m, 64)
        fast_err = (fast.float() - truth).abs().max().item()
        # The packed scales are the fp16 ones rounded to bf16 (module docstring): a relative 2^-9 per weight more.
        assert fast_err <= 1.5 * ref_err + 2e-3 * truth.abs().max().item(), (m, fast_err, ref_err)


def test_packed_q8_0_experts_pick_their_own_matrix() -> None:
    """Stacked experts [E, N, K]: expert e's product is that expert's gguf weights times x, not a neighbour's."""
    t, w = _gguf_weight("Q8_0", (3,), 32, 64, seed=5)
    packed = prepare_cpu(t, torch.bfloat16)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    for e in range(3):
        truth = x.float() @ w[e].T
        got = cpu_linear(x, packed, e).float()
        assert (got - truth).abs().max() <= 0.02 * truth.abs().max()
        assert (got - x.float() @ w[(e + 1) % 3].T).abs().max() > 0.1 * truth.abs().max()

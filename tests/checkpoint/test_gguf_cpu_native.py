"""GGUF's K-quant weights on the native CPU kernel (kernels/int_dot.c): Q6_K, Q3_K and Q2_K have groups of 16
(the kernel's 16-column units), Q4_K and Q5_K groups of 32 with float offsets. gguf has no Python quantizer for
them, so the blocks are random valid ones (gguf_testing.random_blocks); the product is held to gguf's own
dequantization times x, within the int8 activations' ~0.5% of its norm, for one row, a few and a prefill's worth."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf_testing import random_blocks

from mixtral.checkpoint.gguf_quants import decode_blocks
from mixtral.quant.int_cpu import cpu_linear, prepare_cpu


@pytest.mark.native_cpu
@pytest.mark.parametrize("type_name", ["Q6_K", "Q3_K", "Q2_K", "Q4_K", "Q5_K"])
def test_k_quants_through_the_native_kernel_are_gguf_dequantize_times_x(type_name: str) -> None:
    n, k = 48, 512
    raw = random_blocks(type_name, n, k, np.random.default_rng(3))
    t = decode_blocks(type_name, torch.from_numpy(raw), k)
    truth_w = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name])).reshape(n, k)
    native = prepare_cpu(t, torch.bfloat16, "native")
    assert any(key in native for key in ("cpu_n4", "cpu_n8")), sorted(native)
    g = torch.Generator().manual_seed(1)
    for m in (1, 3, 40):
        x = torch.randn(m, k, generator=g).bfloat16()
        truth = x.float() @ truth_w.T
        got = cpu_linear(x, native).float()
        assert float((got - truth).norm() / truth.norm()) < 0.015, m

"""Every supported GGUF block type decodes to canonical tensors whose dequantization is gguf's, bit for bit."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from mixtral.checkpoint.gguf_quants import GGUF_TYPES, decode_blocks
from mixtral.quant.int_layout import IntFormat, dequantize

# Byte offsets of each type's fp16 fields (random bytes there could be NaN/inf: they get real values).
F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
              "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def _random_blocks(type_name: str, rows: int, in_features: int, seed: int = 0) -> np.ndarray:
    block, nbytes, _, _ = GGUF_TYPES[type_name]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, in_features // block, nbytes), dtype=np.uint8)
    for off in F16_FIELDS[type_name]:
        d = (rng.random((rows, in_features // block)) * 0.02 + 1e-4).astype(np.float16)
        raw[..., off:off + 2] = d.view(np.uint8).reshape(rows, in_features // block, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("type_name", sorted(GGUF_TYPES))
def test_decode_matches_gguf_dequantize(type_name: str) -> None:
    rows, in_features = 6, 512
    raw = _random_blocks(type_name, rows, in_features)
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name])  # [rows, in] fp32
    t = decode_blocks(type_name, torch.from_numpy(raw), in_features)
    assert IntFormat.of(t) == GGUF_TYPES[type_name][3]
    got = dequantize(t, torch.float32)
    assert got.shape == (rows, in_features)
    assert torch.equal(got, torch.from_numpy(expected.astype(np.float32)))


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_decode_of_gguf_quantized_weights(type_name: str) -> None:
    """Blocks written by gguf's own quantizer (real scales, real codes) round-trip too, with leading dims."""
    w = np.random.default_rng(1).standard_normal((2, 8, 128)).astype(np.float32) * 0.05
    qtype = gguf.GGMLQuantizationType[type_name]
    raw = gguf.quants.quantize(w, qtype)  # [2, 8, row_bytes]
    t = decode_blocks(type_name, torch.from_numpy(raw), 128)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    assert torch.equal(dequantize(t, torch.float32), expected)
    assert (expected - torch.from_numpy(w)).abs().max() < 0.02  # it is a quantization of w


def test_wrong_row_length_is_named() -> None:
    with pytest.raises(ValueError, match="Q8_0 rows of 64 weights need 68 bytes"):
        decode_blocks("Q8_0", torch.zeros(2, 60, dtype=torch.uint8), 64)

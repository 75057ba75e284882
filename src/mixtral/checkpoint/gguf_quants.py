"""GGUF quantized blocks -> the canonical integer layout (quant/int_layout.py), exactly.

Each supported GGML type decodes its blocks (bytes, little-endian, ``block_size`` weights along a row's input
axis) into codes, one scale per group and (float form) one offset per group, such that the canonical value
``(c - 8) * s`` / ``c * s`` / ``c * s + o`` equals what ``gguf.quants.dequantize`` computes in fp32, bit for
bit (tests/checkpoint/test_gguf_quants.py holds every type to it). The block layouts are ggml's:

- Q4_0 (18 B / 32): fp16 d, 16 bytes: weight i < 16 in byte i's low nibble, 16 + i in its high nibble.
- Q4_1 (20 B / 32): fp16 d, fp16 m, nibbles as Q4_0; value d q + m.
- Q5_0 (22 B / 32): fp16 d, uint32 of fifth bits (bit i -> weight i), nibbles as Q4_0; value d (q - 16).
- Q5_1 (24 B / 32): fp16 d, fp16 m, fifth bits, nibbles; value d q + m.
- Q8_0 (34 B / 32): fp16 d, 32 int8.
- Q2_K (84 B / 256): 16 bytes of (4-bit scale | 4-bit min << 4), 64 bytes of 2-bit codes, fp16 d, fp16 dmin;
  sub-blocks of 16; value d sc q - dmin m.
- Q3_K (110 B / 256): 32 bytes of high-bit masks, 64 of 2-bit codes, 12 of 6-bit scales, fp16 d; sub-blocks
  of 16; value d (sc - 32) q with q = low 2 bits - 4 where the mask bit is 0.
- Q4_K (144 B / 256): fp16 d, fp16 dmin, 12 bytes of eight 6-bit scales and mins, 128 bytes of nibbles
  (byte 32c + i: weight 64c + i low, 64c + 32 + i high); sub-blocks of 32; value d sc q - dmin m.
- Q5_K (176 B / 256): as Q4_K plus 32 bytes of fifth bits (bit j of byte i -> weight 32j + i).
- Q6_K (210 B / 256): 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales, fp16 d; sub-blocks of 16;
  value d sc (q - 32).

Not here: the file, its metadata and tensor names (gguf_file.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mixtral.quant.base import QuantTensors
from mixtral.quant.int_layout import IntFormat, pack_int4

# Decoded block tensors: codes [R, nb, B] (int, value domain of the format), scales [R, nb, S] fp32/fp16,
# offsets [R, nb, S] or None; S = sub-blocks per block.
Decoded = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Two bytes [..., 2] -> fp16 [...]."""
    return b.contiguous().view(torch.float16).squeeze(-1)


def _nibbles_split(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16] bytes -> [..., 32] codes: low nibbles (weights 0-15) then high nibbles (16-31)."""
    return torch.cat((qs & 0xF, qs >> 4), dim=-1)


def _bits(x: torch.Tensor, shifts: list[int], mask: int) -> torch.Tensor:
    """x [..., n] -> [..., len(shifts) * n]: (x >> s) & mask for each shift in turn (ggml's packing order)."""
    return torch.cat([(x >> s) & mask for s in shifts], dim=-1)


def _q4_0(b: torch.Tensor) -> Decoded:
    return _nibbles_split(b[..., 2:18]), _f16(b[..., 0:2]).unsqueeze(-1), None


def _q4_1(b: torch.Tensor) -> Decoded:
    return _nibbles_split(b[..., 4:20]), _f16(b[..., 0:2]).unsqueeze(-1), _f16(b[..., 2:4]).unsqueeze(-1)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """4 bytes [..., 4] (a little-endian uint32) -> [..., 32] bits, bit i for weight i."""
    return _bits(qh, list(range(8)), 1).reshape(*qh.shape[:-1], 8, 4).transpose(-1, -2).reshape(*qh.shape[:-1], 32)


def _q5_0(b: torch.Tensor) -> Decoded:
    q = _nibbles_split(b[..., 6:22]).to(torch.int16) | (_fifth_bits(b[..., 2:6]).to(torch.int16) << 4)
    return q - 16, _f16(b[..., 0:2]).unsqueeze(-1), None


def _q5_1(b: torch.Tensor) -> Decoded:
    q = _nibbles_split(b[..., 8:24]).to(torch.int16) | (_fifth_bits(b[..., 4:8]).to(torch.int16) << 4)
    return q, _f16(b[..., 0:2]).unsqueeze(-1), _f16(b[..., 2:4]).unsqueeze(-1)


def _q8_0(b: torch.Tensor) -> Decoded:
    return b[..., 2:34].contiguous().view(torch.int8), _f16(b[..., 0:2]).unsqueeze(-1), None


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins [..., 8] (int32).

    Bytes 0-3: scales 0-3 (low 6 bits); 4-7: mins 0-3; 8-11: low nibble = scale 4-7's low 4 bits, high nibble
    = min 4-7's; the top 2 bits of bytes 0-3 (4-7) are scale (min) 4-7's high 2 bits."""
    s = s.to(torch.int32)
    lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat((lo & 63, (hi & 0xF) | ((lo >> 6) << 4)), dim=-1)
    mn = torch.cat((mid & 63, (hi >> 4) | ((mid >> 6) << 4)), dim=-1)
    return sc, mn


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes [..., 128] -> [..., 256]: byte 32c + i holds weight 64c + i (low) and 64c + 32 + i (high)."""
    chunks = qs.reshape(*qs.shape[:-1], 4, 32)
    return torch.cat((chunks & 0xF, chunks >> 4), dim=-1).reshape(*qs.shape[:-1], 256)


def _q4_k(b: torch.Tensor) -> Decoded:
    d, dmin = _f16(b[..., 0:2]).float(), _f16(b[..., 2:4]).float()
    sc, mn = _k_scale_min(b[..., 4:16])
    return _k_nibbles(b[..., 16:144]), d[..., None] * sc, -(dmin[..., None] * mn)


def _q5_k(b: torch.Tensor) -> Decoded:
    d, dmin = _f16(b[..., 0:2]).float(), _f16(b[..., 2:4]).float()
    sc, mn = _k_scale_min(b[..., 4:16])
    high = _bits(b[..., 16:48], list(range(8)), 1)  # [..., 256]: bit j of byte i -> weight 32 j + i
    q = _k_nibbles(b[..., 48:176]).to(torch.int16) | (high.to(torch.int16) << 4)
    return q, d[..., None] * sc, -(dmin[..., None] * mn)


def _q6_k(b: torch.Tensor) -> Decoded:
    ql = b[..., 0:128].reshape(*b.shape[:-1], 2, 64)
    low = torch.cat((ql & 0xF, ql >> 4), dim=-1).reshape(*b.shape[:-1], 256)  # weight 128c + 64h + i
    qh = b[..., 128:192].reshape(*b.shape[:-1], 2, 32)
    high = _bits(qh, [0, 2, 4, 6], 3).reshape(*b.shape[:-1], 256)  # weight 128c + 32s + i
    q = (low.to(torch.int16) | (high.to(torch.int16) << 4)) - 32
    sc = b[..., 192:208].contiguous().view(torch.int8).float()
    d = _f16(b[..., 208:210]).float()
    return q, d[..., None] * sc, None


def _q2_k(b: torch.Tensor) -> Decoded:
    sc = b[..., 0:16].to(torch.int32)
    qs = b[..., 16:80].reshape(*b.shape[:-1], 2, 32)
    q = _bits(qs, [0, 2, 4, 6], 3).reshape(*b.shape[:-1], 256)  # weight 128c + 32s + i
    d, dmin = _f16(b[..., 80:82]).float(), _f16(b[..., 82:84]).float()
    return q, d[..., None] * (sc & 0xF), -(dmin[..., None] * (sc >> 4))


def _q3_k(b: torch.Tensor) -> Decoded:
    hmask = b[..., 0:32]
    qs = b[..., 32:96].reshape(*b.shape[:-1], 2, 32)
    low = _bits(qs, [0, 2, 4, 6], 3).reshape(*b.shape[:-1], 256).to(torch.int16)
    high = _bits(hmask, list(range(8)), 1).to(torch.int16)  # bit j of byte i -> weight 32 j + i
    q = low - 4 * (1 - high)  # -4..3
    raw = b[..., 96:108].to(torch.int32)
    lsc = torch.cat((raw[..., 0:8] & 0xF, raw[..., 0:8] >> 4), dim=-1)  # [..., 16]
    hsc = _bits(raw[..., 8:12], [0, 2, 4, 6], 3)  # [..., 16]
    sc = (lsc | (hsc << 4)) - 32
    d = _f16(b[..., 108:110]).float()
    return q + 8, d[..., None] * sc, None  # 4-bit symmetric codes: value (c - 8) s


# name -> (block size, bytes per block, decoder, canonical format)
GGUF_TYPES: dict[str, tuple[int, int, Callable[[torch.Tensor], Decoded], IntFormat]] = {
    "Q4_0": (32, 18, _q4_0, IntFormat(4, 32, torch.float16, "none")),
    "Q4_1": (32, 20, _q4_1, IntFormat(4, 32, torch.float16, "float")),
    "Q5_0": (32, 22, _q5_0, IntFormat(8, 32, torch.float16, "none")),
    "Q5_1": (32, 24, _q5_1, IntFormat(8, 32, torch.float16, "float")),
    "Q8_0": (32, 34, _q8_0, IntFormat(8, 32, torch.float16, "none")),
    "Q2_K": (256, 84, _q2_k, IntFormat(4, 16, torch.float32, "float")),
    "Q3_K": (256, 110, _q3_k, IntFormat(4, 16, torch.float32, "none")),
    "Q4_K": (256, 144, _q4_k, IntFormat(4, 32, torch.float32, "float")),
    "Q5_K": (256, 176, _q5_k, IntFormat(8, 32, torch.float32, "float")),
    "Q6_K": (256, 210, _q6_k, IntFormat(8, 16, torch.float32, "none")),
}
FLOAT_TYPES: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def decode_blocks(type_name: str, raw: torch.Tensor, in_features: int) -> QuantTensors:
    """Raw bytes [*lead, out, in / block * bytes] of a ``type_name`` tensor -> canonical stored tensors
    [*lead, out, ...] in ``GGUF_TYPES[type_name]``'s format."""
    block, nbytes, decode, fmt = GGUF_TYPES[type_name]
    *lead, row_bytes = raw.shape
    nb = in_features // block
    if in_features % block or row_bytes != nb * nbytes:
        raise ValueError(f"{type_name} rows of {in_features} weights need {in_features // block * nbytes} bytes "
                         f"in blocks of {block}; got {row_bytes} bytes")
    codes, scales, offsets = decode(raw.reshape(*lead, nb, nbytes))
    codes = codes.reshape(*lead, in_features)
    out: QuantTensors = {
        "qweight": pack_int4(codes) if fmt.bits == 4 else codes.to(torch.int8),
        "scales": scales.reshape(*lead, -1).to(fmt.scale_dtype),
    }
    if offsets is not None:
        out["offsets"] = offsets.reshape(*lead, -1).to(fmt.scale_dtype)
    return out

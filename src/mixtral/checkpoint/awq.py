"""AutoAWQ checkpoints (the GEMM layout) -> the int4 method's canonical tensors, exactly.

Per quantized linear ``{module}`` (HF names; the logical weight is [out, in]):

- ``qweight`` int32 [in, out / 8]: row i holds input column i of eight output columns per int32; nibble k
  (bits 4k..4k+3) holds output column ``8 j + AWQ_PACK_ORDER[k]`` of word j (AWQ_PACK_ORDER = 0, 2, 4, 6, 1,
  3, 5, 7: the order AutoAWQ's CUDA kernel dequantizes in);
- ``qzeros`` int32 [in / g, out / 8], packed the same way; the zero point as is (no offset);
- ``scales`` fp16 [in / g, out].

Value: ``(q - z) * s``, computed by AutoAWQ in fp16 (exact integer difference, one rounding of the product),
which the canonical ``(c - z) * s`` reproduces. Canonical: codes uint8 [out, in / 2] (transposed, nibbles in
column order), scales [out, in / g], zeros uint8 [out, in / g]. The GEMV layout (``version: "gemv"``) and
AWQ without zero points are refused (quant_config.py, ``check_awq``). Not here: file reading (int_formats.py).
"""

from __future__ import annotations

import torch

from mixtral.quant.base import QuantSpec, QuantTensors
from mixtral.quant.int_layout import pack_int4

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
Entries = dict[str, tuple[str, tuple[int, ...]]]  # role -> (tensor name, shape)
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C / 8] in AWQ's order -> uint8 [R, C] codes in column order."""
    nibbles = (packed.to(torch.int32)[..., None] >> _SHIFTS) & 0xF  # [R, C/8, 8] nibble k
    cols = torch.empty_like(nibbles)
    cols[..., list(AWQ_PACK_ORDER)] = nibbles  # column AWQ_PACK_ORDER[k] of each word <- nibble k
    return cols.reshape(packed.shape[0], -1).to(torch.uint8)


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [R, C] codes -> int32 [R, C / 8] in AWQ's order (the inverse of ``unpack_awq``; writes test files)."""
    cols = codes.to(torch.int64).reshape(codes.shape[0], -1, 8)
    return to_int32(cols[..., list(AWQ_PACK_ORDER)] << _SHIFTS.to(torch.int64))  # nibble k <- column ORDER[k]


def to_int32(fields: torch.Tensor) -> torch.Tensor:
    """Disjoint bit fields [..., n] (int64, together < 2^32) -> their sum as the int32 with those bits."""
    v = fields.sum(dim=-1)
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def entries(module: str, out_features: int, in_features: int, qspec: QuantSpec) -> Entries:
    """role -> (tensor name, expected shape) of one AWQ linear."""
    groups = in_features // qspec.group_size if qspec.group_size else 1
    return {"qweight": (f"{module}.qweight", (in_features, out_features // 8)),
            "qzeros": (f"{module}.qzeros", (groups, out_features // 8)),
            "scales": (f"{module}.scales", (groups, out_features))}


def to_canonical(t: dict[str, torch.Tensor], qspec: QuantSpec, module: str = "") -> QuantTensors:
    """One AWQ linear's tensors (by role) -> canonical int4 tensors [out, ...] with zero points."""
    codes = unpack_awq(t["qweight"]).T  # [out, in]
    zeros = unpack_awq(t["qzeros"]).T.contiguous()  # [out, G]
    scales = t["scales"].T.contiguous()  # [out, G]
    if not qspec.group_size:
        zeros, scales = zeros[:, 0].contiguous(), scales[:, 0].contiguous()
    return {"qweight": pack_int4(codes), "scales": scales, "zeros": zeros}

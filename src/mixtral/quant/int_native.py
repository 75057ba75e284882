"""The integer-dot CPU kernel's weight layout (kernels/int_dot.c): packing at load.

A weight [*lead, N, K] becomes (keys of the repacked QuantTensors):

- ``cpu_n4`` / ``cpu_n8``: uint8 [*lead, N / 16, K * 8] (int4) or [*lead, N / 16, K * 16] (int8): per tile of
  16 output channels, 64-byte runs of 8 (int4) or 4 (int8) columns, byte 4c + i channel c's code of column
  k0 + i (int4: low nibble; the high nibble holds column k0 + 4 + i). Unsigned codes: int4 0..15 with its
  zero 8, int8 c + 128;
- ``cpu_ns``: S, bf16 [*lead, N / 16, K / g, 16], g the kernel's group;
- ``cpu_nz``: Z like ``cpu_ns``, absent when every Z is 0 (symmetric codes);

and the weight is ``(u - off) * S + Z`` (off 8 or 128), the same S and Z as the packed int4 layout's
(quant/int_cpu.py) rounded the same way. Worked example (int4, one tile, columns 0..7): byte 4 * 2 + 1 =
byte 9 holds channel 2's code of column 1 in its low nibble and of column 5 in its high one.

Not here: building or calling the kernel (kernels/cpu_native.py), choosing it (quant/int_cpu.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mixtral.quant.base import QuantTensors

NATIVE_KEYS = ("cpu_n4", "cpu_n8")


def fits(n: int, k: int, group: int) -> bool:
    """Whether the kernel takes an N x K weight with groups of ``group`` columns (K for one per channel)."""
    return n % 16 == 0 and k % 32 == 0 and group % 16 == 0 and k % group == 0


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes uint8 [*lead, N, K] (int4 0..15, int8 0..255) -> the kernel's layout (module docstring)."""
    *lead, n, k = codes.shape
    if bits == 4:
        v = codes.reshape(-1, n // 16, 16, k // 8, 2, 4).permute(0, 1, 3, 2, 5, 4)  # [L, T, k/8, 16 c, 4 i, 2 h]
        return (v[..., 0] | (v[..., 1] << 4)).reshape(*lead, n // 16, k * 8).contiguous()
    v = codes.reshape(-1, n // 16, 16, k // 4, 4).permute(0, 1, 3, 2, 4)  # [L, T, k/4, 16 c, 4 i]
    return v.reshape(*lead, n // 16, k * 16).contiguous()


def tile_scales(s: torch.Tensor) -> torch.Tensor:
    """Per-group values [*lead, N, G] -> [*lead, N / 16, G, 16] (a tile's groups contiguous)."""
    *lead, n, g = s.shape
    return s.reshape(*lead, n // 16, 16, g).transpose(-1, -2).contiguous()


def pack_native(codes: torch.Tensor, unsigned: Callable[[torch.Tensor], torch.Tensor], bits: int, s: torch.Tensor,
                z: torch.Tensor | None, dtype: torch.dtype) -> QuantTensors:
    """Canonical codes [*lead, N, *] (``unsigned`` maps one matrix to uint8 [N, K]), fp32 S and Z [*lead, N, G]
    (Z None: all zero) -> the repacked tensors, S and Z rounded once to ``dtype`` (bf16). One matrix at a time, so
    the unpacked temporary stays one matrix."""
    flat = codes.reshape(-1, *codes.shape[-2:])
    pieces = [pack_codes(unsigned(m), bits) for m in flat]  # [T, bytes] each
    packed = torch.stack(pieces).reshape(*codes.shape[:-2], *pieces[0].shape)
    out: QuantTensors = {f"cpu_n{bits}": packed, "cpu_ns": tile_scales(s.to(dtype))}
    if z is not None:
        out["cpu_nz"] = tile_scales(z.to(dtype))
    return out


def native_key(t: QuantTensors) -> str | None:
    return next((k for k in NATIVE_KEYS if k in t), None)

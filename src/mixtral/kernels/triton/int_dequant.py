"""The K-loop step every W4A16 / W8A16 GEMM here shares: load one tile of canonical integer codes and
dequantize it in registers (quant/int_layout.py defines the layout and the value of a code).

``dequant_tile`` reads a [BLOCK_N, BLOCK_K] tile of a weight's rows ``offs_n`` and stored columns
``k0 .. k0 + BLOCK_K``: for 4 bits BLOCK_K / 2 bytes a row (``tl.interleave`` of the low and high nibbles
puts column 2j before 2j+1), for 8 bits BLOCK_K int8. The group scale (and zero point or offset) is one value
a row when the tile sits inside one group (``GROUP % BLOCK_K == 0``, or one scale a row: ``GROUP`` 0), else
one a group, loaded as [BLOCK_N, BLOCK_K / GROUP] and repeated over the group's columns in registers (groups
of 16 or 32, GGUF). The value is computed in fp32 and rounded once to the
activation dtype, exactly as the reference dequantizes before its matmul; only the summation order differs.

``IntWeight`` bundles the canonical tensors and their strides for a launch, and picks a BLOCK_K that the
group structure allows. Not here: the GEMM loops (int_linear.py, int_moe.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mixtral.quant.base import QuantTensors
from mixtral.quant.int_layout import IntFormat

ZERO_CODES = {"none": 0, "int": 1, "float": 2}


@triton.jit
def _per_column(v, GROUP: tl.constexpr):
    """[BN, BK/G] values of groups -> [BN, BK]: column j takes group j // G's value. Loading a value per column
    instead would pipeline [BN, BK] fp32 tiles of scales (and offsets) through shared memory, G times the
    bytes: 128 KB a stage for Q4_K's w1 and w3 at 64 x 128 tiles, past Hopper's 227 KB at 3 stages."""
    rows: tl.constexpr = v.shape[0]
    groups: tl.constexpr = v.shape[1]
    return tl.reshape(tl.broadcast_to(v[:, :, None], (rows, groups, GROUP)), (rows, groups * GROUP))


@triton.jit
def dequant_tile(qw_ptr, s_ptr, z_ptr, offs_n, n_ok, k0, stride_qn, stride_sn,
                 BITS: tl.constexpr, GROUP: tl.constexpr, ZERO: tl.constexpr, BLOCK_K: tl.constexpr):
    """The fp32 values [BLOCK_N, BLOCK_K] of rows ``offs_n`` and stored columns k0..k0+BLOCK_K of one weight
    (``qw_ptr``/``s_ptr``/``z_ptr`` already at the weight, e.g. one expert). ZERO: 0 symmetric, 1 integer zero
    points, 2 float offsets (``z_ptr`` then points at the offsets)."""
    rows = offs_n[:, None].to(tl.int64)
    if BITS == 4:
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # [BK/2] bytes
        b = tl.load(qw_ptr + rows * stride_qn + offs_b[None, :], mask=n_ok[:, None], other=0)  # [BN, BK/2]
        c = tl.interleave(b & 0xF, b >> 4).to(tl.float32)  # [BN, BK]: column 2j low nibble, 2j+1 high
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        c = tl.load(qw_ptr + rows * stride_qn + offs_k[None, :], mask=n_ok[:, None], other=0).to(tl.float32)
    if GROUP == 0 or GROUP % BLOCK_K == 0:  # one scale per row for this tile
        g = 0 if GROUP == 0 else k0 // GROUP
        s_off = offs_n.to(tl.int64) * stride_sn + g
        s = tl.load(s_ptr + s_off, mask=n_ok, other=0.0).to(tl.float32)[:, None]  # [BN, 1]
        if ZERO != 0:
            z = tl.load(z_ptr + s_off, mask=n_ok, other=0).to(tl.float32)[:, None]
    else:  # several groups in the tile (GGUF's 16 / 32): one load a group, repeated over its columns in registers
        groups = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)  # [BK/G]
        s_off = rows * stride_sn + groups[None, :]  # [BN, BK/G]
        s = _per_column(tl.load(s_ptr + s_off, mask=n_ok[:, None], other=0.0).to(tl.float32), GROUP)  # [BN, BK]
        if ZERO != 0:
            z = _per_column(tl.load(z_ptr + s_off, mask=n_ok[:, None], other=0).to(tl.float32), GROUP)
    if ZERO == 0:
        w = (c - 8.0) * s if BITS == 4 else c * s
    elif ZERO == 1:
        w = (c - z) * s
    else:
        w = c * s + z
    return w


@dataclass(frozen=True)
class IntWeight:
    """A canonical int weight [*lead, N, K] ready for a kernel: its tensors, format and strides (the last two
    dims; ``lead`` strides for stacked experts)."""

    t: QuantTensors
    fmt: IntFormat
    n: int
    k: int

    @classmethod
    def of(cls, t: QuantTensors) -> IntWeight:
        fmt = IntFormat.of(t)
        qw = t["qweight"]
        for name in ("scales", "zeros", "offsets"):
            if name in t and t[name].stride(-1) != 1:
                raise ValueError(f"int kernels: {name} must be contiguous in its last dim")
        if qw.stride(-1) != 1:
            raise ValueError("int kernels: qweight must be contiguous in its last dim")
        if "zeros" in t and t["zeros"].stride() != t["scales"].stride():
            raise ValueError("int kernels: zeros must be laid out like scales")
        if "offsets" in t and t["offsets"].stride() != t["scales"].stride():
            raise ValueError("int kernels: offsets must be laid out like scales")
        return cls(t, fmt, qw.shape[-2], qw.shape[-1] * (2 if fmt.bits == 4 else 1))

    @property
    def qweight(self) -> torch.Tensor:
        return self.t["qweight"]

    @property
    def scales(self) -> torch.Tensor:
        return self.t["scales"]

    @property
    def zero_tensor(self) -> torch.Tensor:
        """What the kernel's ``z_ptr`` points at: zeros, offsets, or (unused) the scales."""
        return self.t.get("zeros", self.t.get("offsets", self.t["scales"]))

    @property
    def perm(self) -> torch.Tensor | None:
        return self.t.get("perm")

    @property
    def zero_code(self) -> int:
        return ZERO_CODES[self.fmt.zero]

    @property
    def scale_row_stride(self) -> int:
        """Elements between two rows' scales: the group count (0 for one scale a row is row stride 1)."""
        return self.scales.stride(-2) if self.fmt.group_size else self.scales.stride(-1)

    def block_k(self, want: int) -> int:
        """The largest power of two <= ``want`` that divides K and fits the groups (divides the group, or is a
        multiple of it), at least 16 (one tl.dot); a clear error when there is none."""
        g = self.fmt.group_size
        bk = triton.next_power_of_2(max(want, 16))
        while bk >= 16:
            fits = g == 0 or g % bk == 0 or bk % g == 0
            if self.k % bk == 0 and fits:
                return bk
            bk //= 2
        raise ValueError(f"int kernels: no K tile of >= 16 columns divides K={self.k} with group {g}")

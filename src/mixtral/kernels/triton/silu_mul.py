"""SwiGLU activation of a [rows, 2F] gate/up matrix in one pass: act = silu(gate) * up, fp32 math, one rounding.

The glue between the two grouped GEMMs of ``kernels/grouped_mm_moe.py``: the first GEMM writes w1 rows then w3
rows side by side (``h[:, :F]`` gate, ``h[:, F:]`` up), this kernel reads both halves once and writes the
half-width activation. It is memory-bound (reads 2F, writes F elements a row); doing it in PyTorch ops costs
three to five passes over the same bytes. Not for training (no backward).

Rows at or past ``*num_rows_ptr`` (a device scalar) are skipped: in the MoE those rows belong to another
expert-parallel rank, the GEMM never wrote them, and reading the count from device memory keeps the launch
free of host syncs (capturable in a CUDA graph).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(h_ptr, out_ptr, num_rows_ptr, F, stride_h, stride_o, BLOCK: tl.constexpr):
    """out[row, c] = silu(h[row, c]) * h[row, F + c] for one row and BLOCK columns."""
    row = tl.program_id(0)
    if row >= tl.load(num_rows_ptr):
        return
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    ok = cols < F
    h_row = h_ptr + row.to(tl.int64) * stride_h
    gate = tl.load(h_row + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(h_row + F + cols, mask=ok, other=0.0).to(tl.float32)
    act = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row.to(tl.int64) * stride_o + cols, act.to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul(h: torch.Tensor, num_rows: torch.Tensor | None = None, block: int = 1024) -> torch.Tensor:
    """h [R, 2F] (gate columns then up columns) -> [R, F] in h's dtype.

    ``num_rows`` (int32/int64 device tensor with one element) limits the work to the first rows; the rows
    after it are left uninitialised in the result. None means all R rows.
    """
    if h.dim() != 2 or h.shape[1] % 2:
        raise ValueError(f"silu_mul: expected h [R, 2F] with an even column count, got {tuple(h.shape)}")
    if h.stride(-1) != 1:
        raise ValueError(f"silu_mul: h must be contiguous in its last dim, got strides {h.stride()}")
    rows, f = h.shape[0], h.shape[1] // 2
    out = torch.empty(rows, f, dtype=h.dtype, device=h.device)  # [R, F]
    if rows == 0 or f == 0:
        return out
    if num_rows is None:
        num_rows = torch.full((1,), rows, dtype=torch.int32, device=h.device)
    if num_rows.numel() != 1:
        raise ValueError(f"silu_mul: num_rows must hold one element, got shape {tuple(num_rows.shape)}")
    block = min(block, triton.next_power_of_2(f))
    _silu_mul_kernel[(rows, triton.cdiv(f, block))](
        h, out, num_rows, f, h.stride(0), out.stride(0), BLOCK=block, num_warps=4 if block >= 512 else 1,
    )
    return out

"""The memory-bound glue around the two grouped GEMMs of ``kernels/grouped_mm_moe.py``, one pass each.

- ``silu_mul``: the first GEMM writes w1 rows then w3 rows side by side (``h[:, :F]`` gate, ``h[:, F:]`` up);
  one read of both halves, one write of act = silu(gate) * up, fp32 math, one rounding.
- ``weighted_topk_sum``: the second GEMM leaves each pair's row in expert order; for every token gather its
  k rows, scale each by its fp32 routing weight, sum in fp32 and round once.
Done with PyTorch ops each costs three to six passes over the same bytes (fp32 temporaries of [N, k, D]).

Both read ``num_local`` (the last group end, a device scalar) instead of a host int: rows from it on belong
to another expert-parallel rank, were never written by the GEMMs (may hold NaN) and are skipped. No host
sync, so a step stays capturable in a CUDA graph. No backward: inference only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixtral.kernels.triton.pdl import pdl_args, pdl_enter


@triton.jit
def _silu_mul_kernel(h_ptr, out_ptr, num_rows_ptr, F, stride_h, stride_o, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """out[row, c] = silu(h[row, c]) * h[row, F + c] for one row and BLOCK columns."""
    pdl_enter(PDL)
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
        h, out, num_rows, f, h.stride(0), out.stride(0), BLOCK=block, num_warps=4 if block >= 512 else 1, **pdl_args(h),
    )
    return out


@triton.jit
def _weighted_topk_sum_kernel(y_ptr, row_of_pair_ptr, weights_ptr, out_ptr, num_local_ptr, D, stride_y, stride_o,
                              TOP_K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """out[t, c] = sum_j weights[t, j] * y[row_of_pair[t, j], c] over the pairs whose row < num_local."""
    pdl_enter(PDL)
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    num_local = tl.load(num_local_ptr)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = token.to(tl.int64) * TOP_K + j
        row = tl.load(row_of_pair_ptr + pair)
        w = tl.load(weights_ptr + pair).to(tl.float32)
        # Another rank's row is never read (its memory was never written): no column is in bounds for it.
        limit = tl.where(row < num_local, D, 0)
        y = tl.load(y_ptr + row.to(tl.int64) * stride_y + cols, mask=cols < limit, other=0.0)
        acc += w * y.to(tl.float32)
    tl.store(out_ptr + token.to(tl.int64) * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < D)


def weighted_topk_sum(y: torch.Tensor, row_of_pair: torch.Tensor, topk_weights: torch.Tensor,
                      num_local: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """y [P, D] rows in expert order; row_of_pair [N*k] (pair t*k+j -> its row of y); topk_weights [N, k] fp32;
    num_local (device, one element): rows from it on are another rank's and add nothing -> [N, D] in y's dtype.

    Example, k 2: row_of_pair [2, 0, 1, 3], num_local 3 -> out[0] = w00 y[2] + w01 y[0], out[1] = w10 y[1]
    (row 3 is past num_local: skipped).
    """
    n, k = topk_weights.shape
    d = y.shape[1]
    if row_of_pair.numel() != n * k or y.dim() != 2 or y.stride(-1) != 1:
        raise ValueError(f"weighted_topk_sum: y {tuple(y.shape)} (strides {y.stride()}), row_of_pair "
                         f"{tuple(row_of_pair.shape)} and topk_weights {tuple(topk_weights.shape)} do not fit "
                         "y [P, D] contiguous rows, row_of_pair [N*k], topk_weights [N, k]")
    out = torch.empty(n, d, dtype=y.dtype, device=y.device)  # [N, D]
    if n == 0 or d == 0:
        return out
    block = min(block, triton.next_power_of_2(d))
    _weighted_topk_sum_kernel[(n, triton.cdiv(d, block))](
        y, row_of_pair.contiguous(), topk_weights.float().contiguous(), out, num_local, d, y.stride(0),
        out.stride(0), TOP_K=k, BLOCK=block, num_warps=4 if block >= 512 else 1, **pdl_args(y),
    )
    return out

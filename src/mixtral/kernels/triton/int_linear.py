"""W4A16 / W8A16 dense projections (wqkv, wo, a quantized lm_head) in Triton: ``x @ dequant(W)^T``.

One program owns a [BLOCK_M, BLOCK_N] output tile and walks K, dequantizing each [BLOCK_N, BLOCK_K] weight
tile in registers (int_dequant.py) before a ``tl.dot`` with fp32 accumulation; the weights stream from memory
once per row block, as codes (a quarter or half of bf16's bytes). Decode (M <= 16) uses 16-row tiles and
narrow column tiles so a 4096-wide projection still spreads over the GPU; prefill uses 64-row tiles. Act-order
weights (``perm``) read input column ``perm[k]`` for stored column k. Tiles are untuned defaults
(``linear_tiles``): the GPU tests hold correctness; tuning is a GPU job.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixtral.kernels.triton.int_dequant import IntWeight, dequant_tile
from mixtral.kernels.triton.pdl import pdl_args, pdl_enter
from mixtral.quant.base import QuantTensors


@triton.jit
def _int_linear_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, out_ptr, M, N, K,
    stride_xm, stride_qn, stride_sn, stride_om,
    BITS: tl.constexpr, GROUP: tl.constexpr, ZERO: tl.constexpr, HAS_PERM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    m_ok = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if HAS_PERM:
            cols = tl.load(perm_ptr + k0 + offs_k)  # [BK] input column of each stored column
        else:
            cols = k0 + offs_k
        a = tl.load(x_rows + cols[None, :], mask=m_ok[:, None], other=0.0)  # [BM, BK]
        w = dequant_tile(qw_ptr, s_ptr, z_ptr, offs_n, n_ok, k0, stride_qn, stride_sn, BITS, GROUP, ZERO, BLOCK_K)
        w = w.to(x_ptr.dtype.element_ty)  # [BN, BK], rounded once as the reference's dequantized weight
        if IEEE:
            acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(w), acc)
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def linear_tiles(m: int) -> tuple[int, int, int, int, int]:
    """(block_m, block_n, block_k, num_warps, num_stages) by row count: untuned defaults."""
    if m <= 16:
        return 16, 32, 128, 4, 4
    if m <= 64:
        return 32, 64, 64, 4, 3
    return 64, 128, 64, 8, 3


def int_linear(x: torch.Tensor, t: QuantTensors, tiles: tuple[int, int, int, int, int] | None = None,
               pdl: bool = True) -> torch.Tensor:
    """x [M, K] (bf16 / fp16 / fp32) @ dequant(t)^T, t a canonical int weight [N, K] -> [M, N] in x's dtype."""
    w = IntWeight.of(t)
    if w.qweight.dim() != 2:
        raise ValueError(f"int_linear takes one [N, K] weight, got codes of shape {tuple(w.qweight.shape)}")
    m, k = x.shape
    if k != w.k:
        raise ValueError(f"int_linear: x has {k} columns, the weight {w.k}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(m, w.n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    block_m, block_n, block_k, warps, stages = tiles or linear_tiles(m)
    block_k = w.block_k(block_k)
    perm = w.perm
    _int_linear_kernel[(triton.cdiv(m, block_m), triton.cdiv(w.n, block_n))](
        x, w.qweight, w.scales, w.zero_tensor, perm if perm is not None else w.scales, out, m, w.n, k,
        x.stride(0), w.qweight.stride(0), w.scale_row_stride, out.stride(0),
        BITS=w.fmt.bits, GROUP=w.fmt.group_size, ZERO=w.zero_code, HAS_PERM=perm is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=x.dtype == torch.float32,
        num_warps=warps, num_stages=stages, **pdl_args(x, pdl),
    )
    return out

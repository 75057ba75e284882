"""Dense FP8 projections (wqkv, wo) in Triton: codes x codes on the FP8 tensor cores, scales in the epilogue.

``fp8_linear(x, weight, weight_scale, input_scale)`` = ``quant.fp8.qlinear_reference`` on the device: the rows
of x are quantized per token (``fp8_quant.quantize_rows``), then ``fp8_gemm`` sums code products in fp32 and
multiplies each output by its row's and its column's scale before the one rounding to x's dtype.

One kernel, two launch shapes (``config``): decode batches (at most ``DECODE_MAX_ROWS`` rows) stream the
weight like ``skinny_gemm.py`` (a 16-row tile, narrow column tiles, a deep pipeline: the whole matrix is read
once at half the bf16 bytes); larger batches take 128 x 128 tiles, walked in groups of ``GROUP_M`` row
tiles so neighbouring programs share weight tiles in L2. The weight [N, K] is K-contiguous, which is the
operand order the FP8 MMA wants (both operands K-major), so no transpose happens on the way. Tiles are
untuned starting points (tests/gpu/test_fp8_kernels.py reports the rates next to ``torch._scaled_mm``'s).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixtral.kernels.triton.fp8_quant import quantize_rows
from mixtral.kernels.triton.pdl import pdl_args, pdl_enter
from mixtral.quant.fp8 import FP8

DECODE_MAX_ROWS = 16
# (block_m, block_n, block_k, num_warps, num_stages, group_m)
DECODE_TILE = (16, 32, 256, 4, 5, 1)
PREFILL_TILE = (128, 128, 128, 8, 3, 8)


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, out_ptr, M, N, K, stride_am, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, PDL: tl.constexpr,
):
    """out[m, n] = a_scale[m] * w_scale[n] * sum_k a[m, k] w[n, k] for one [BLOCK_M, BLOCK_N] tile."""
    pdl_enter(PDL)
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row tiles sweep a column tile before moving on, so its weights stay in L2.
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    m_ok = offs_m < M
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]  # [BM, BK]
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BK, BN] = W^T tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = offs_k + k0 < K
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    a_scale = tl.load(a_scale_ptr + offs_m, mask=m_ok, other=0.0)  # [BM]
    w_scale = tl.load(w_scale_ptr + offs_n, mask=n_ok, other=0.0)  # [BN]
    acc = acc * a_scale[:, None] * w_scale[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
             out_dtype: torch.dtype, config: tuple[int, int, int, int, int, int] | None = None, pdl: bool = True
             ) -> torch.Tensor:
    """a codes [M, K] fp8, a_scale [M] fp32, weight codes [N, K] fp8, weight_scale [N] fp32 -> [M, N] in
    ``out_dtype``; ``config`` overrides the tile (block_m, block_n, block_k, warps, stages, group_m)."""
    m, k = a.shape
    n, k_w = weight.shape
    if k_w != k or a.dtype != FP8 or weight.dtype != FP8 or a_scale.shape != (m,) or weight_scale.shape != (n,):
        raise ValueError(f"fp8_gemm: a {tuple(a.shape)} {a.dtype}, a_scale {tuple(a_scale.shape)}, weight "
                         f"{tuple(weight.shape)} {weight.dtype}, weight_scale {tuple(weight_scale.shape)} do not fit "
                         "fp8 [M, K] x fp8 [N, K] with fp32 scales [M] and [N]")
    if a.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("fp8_gemm: a and weight must be contiguous along K")
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0:
        return out
    bm, bn, bk, warps, stages, group = config or (DECODE_TILE if m <= DECODE_MAX_ROWS else PREFILL_TILE)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _fp8_gemm_kernel[grid](
        a, a_scale, weight, weight_scale, out, m, n, k, a.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, EVEN_K=k % bk == 0, num_warps=warps,
        num_stages=stages, **pdl_args(a, pdl),
    )
    return out


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               input_scale: torch.Tensor | None = None,
               config: tuple[int, int, int, int, int, int] | None = None, pdl: bool = True) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32) -> [M, N] in x's dtype: per-token (or static ``input_scale``) activation
    codes times the FP8 weight, as ``quant.fp8.qlinear_reference``."""
    xq, xs = quantize_rows(x, input_scale, pdl=pdl)
    return fp8_gemm(xq, xs, weight, weight_scale, x.dtype, config, pdl)

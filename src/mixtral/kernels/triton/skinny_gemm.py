"""``x @ W^T`` for a handful of rows (decode steps of 1-16 sequences) in Triton: a weight-streaming GEMV.

At decode sizes a dense layer is a read of its weight matrix; cuBLAS picks split-K GEMV kernels that reach
about 80% of the copy bandwidth on Mixtral's attention projections (and add a reduction launch). Here each
program owns BLOCK_N output columns, streams those weight rows once over the whole K with a deep pipeline,
and multiplies them by the (zero-padded to 16) input rows with ``tl.dot`` in fp32, rounding once. The grid
is cdiv(N, BLOCK_N): no split-K, no second launch. Tile per (N, K) from ``CONFIGS`` (a sweep on an H100; the
same tiles won in a 32-layer decode graph on an H200: docs/KERNELS.md), else ``DEFAULT``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixtral.kernels.triton.pdl import pdl_args, pdl_enter

MAX_ROWS = 16  # one tl.dot tile of rows; larger batches go to cuBLAS

# (block_n, block_k, num_warps, num_stages)
DEFAULT = (32, 256, 4, 4)
# (N, K) -> tile, the lowest total over 1, 4, 8 and 16 rows (H100, bf16; docs/KERNELS.md)
CONFIGS: dict[tuple[int, int], tuple[int, int, int, int]] = {
    (6144, 4096): (32, 128, 4, 5),  # 8x7B wqkv
    (4096, 4096): (32, 256, 4, 4),  # 8x7B wo
    (8192, 6144): (32, 128, 4, 5),  # 8x22B wqkv
    (6144, 6144): (32, 128, 4, 5),  # 8x22B wo
}


@triton.jit
def _skinny_gemm_kernel(
    x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr,
):
    # Reading the first weight tile before the PDL wait (multiplied after the loop) was measured and lost
    # ~1.5 us a layer on an H200 (in a 32-layer decode graph at 9591830), so the weights wait too.
    pdl_enter(PDL)
    offs_m = tl.arange(0, BLOCK_M)  # [BM]
    m_ok = offs_m < M
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    a_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
    b_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BK, BN] = W^T tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = offs_k + k0 < K
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, config: tuple[int, int, int, int] | None = None,
                pdl: bool = True) -> torch.Tensor:
    """x [M, K] (M <= 16), weight [N, K] -> x @ weight^T [M, N] in x's dtype (fp32 accumulation)."""
    m, k = x.shape
    n, k_w = weight.shape
    if k_w != k or m > MAX_ROWS:
        raise ValueError(f"skinny_gemm: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit "
                         f"[M <= {MAX_ROWS}, K] x [N, K]")
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    block_n, block_k, warps, stages = config or CONFIGS.get((n, k), DEFAULT)
    _skinny_gemm_kernel[(triton.cdiv(n, block_n),)](
        x, weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
        num_warps=warps, num_stages=stages, **pdl_args(x, pdl),
    )
    return out

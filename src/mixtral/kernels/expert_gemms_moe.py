"""MoE experts as one cuBLAS GEMM per expert: a prefill path for large token counts.

Same contract as ``reference.moe_reference`` (x [N, D], w13 [E_local, 2F, D], w2 [E_local, D, F],
topk_weights [N, k] fp32, topk_ids [N, k] global ids) and the same glue as ``grouped_mm_moe`` (pair sort,
SiLU·mul in fp32 rounded once, fp32 weighted top-k sum rounded once); only the GEMMs differ. At a 2048-token
prefill each of Mixtral's 8 experts gets ~512 rows, a size at which cuBLAS's dense kernels run faster than
both the Triton fused kernel and the CUTLASS grouped GEMM (scripts/gpu_moe_prefill.py measures all three).

The price is one host sync per layer (the per-expert row counts size the GEMMs), so this path is for eager
prefill steps only: ``ops.fused_moe`` never takes it while a CUDA graph is being captured.
"""

from __future__ import annotations

import torch

from mixtral.kernels.grouped_mm_moe import check_contract, combine, silu_mul, sort_pairs


def expert_gemms_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, expert_start: int = 0) -> torch.Tensor:
    """x [N, D] -> [N, D] in x's dtype: sum over each token's local experts of weight * w2(silu(w1 x) * w3 x)."""
    check_contract(x, w13, w2, topk_weights, topk_ids)
    n, d = x.shape
    if n == 0:
        return x.new_zeros(0, d)
    k = topk_ids.shape[1]
    e_local, two_f, _ = w13.shape
    order, row_of_pair, offs = sort_pairs(topk_ids, e_local, expert_start)  # [P], [P], [E]
    ends = offs.tolist()  # the one host sync: GEMM sizes
    num_local = offs[-1:]  # [1] rows from here on are other ranks' pairs: never multiplied
    m = ends[-1] if ends else 0
    x_sorted = x.index_select(0, order[:m] // k)  # [m, D] row r = token of sorted pair r
    h = torch.empty(m, two_f, dtype=x.dtype, device=x.device)  # [m, 2F]
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            torch.mm(x_sorted[start:end], w13[e].t(), out=h[start:end])
        start = end
    act = silu_mul(h, num_local)  # [m, F]
    y = torch.empty(order.shape[0], d, dtype=x.dtype, device=x.device)  # [P, D]; rows >= m never read
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            torch.mm(act[start:end], w2[e].t(), out=y[start:end])
        start = end
    return combine(y, row_of_pair, topk_weights, num_local)  # [N, D]

"""The fused MoE's epilogue in one kernel: per token, the sum of its top-k pairs' (and split-K slices')
weighted w2 outputs, in fp32, rounded once to the output dtype.

Replaces zero-filling the w2 output, a PyTorch sum over (split, k) and a cast: three launches of a few
microseconds each, a noticeable share of a batch-1 decode layer (~300 us). Pairs routed to another
expert-parallel rank's experts are skipped by id, so the w2 output needs no zeroing (their rows are never
written). Grid (N, cdiv(D, BLOCK_D)): sized from host ints, CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixtral.kernels.triton.pdl import pdl_args, pdl_enter

BLOCK_D = 1024


@triton.jit
def _moe_sum_kernel(
    partials_ptr, ids_ptr, out_ptr,
    D, expert_lo, expert_hi, stride_ps, stride_pp, stride_in, stride_on,
    SPLITS: tl.constexpr, TOP_K: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    n = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    d_ok = offs < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        e = tl.load(ids_ptr + n * stride_in + j)
        # Another rank's expert: load nothing (its row was never written and may hold NaN; NaN * 0 is NaN).
        d_end = tl.where((e >= expert_lo) & (e < expert_hi), D, 0)
        row = partials_ptr + (n * TOP_K + j) * stride_pp + offs
        for s in tl.static_range(SPLITS):
            acc += tl.load(row + s * stride_ps, mask=offs < d_end, other=0.0).to(tl.float32)
    tl.store(out_ptr + n * stride_on + offs, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


def moe_sum(partials: torch.Tensor, topk_ids: torch.Tensor, expert_start: int, num_local: int,
            dtype: torch.dtype, pdl: bool = True) -> torch.Tensor:
    """partials [S, N*k, D] (row t*k + j = token t's j-th pair, written only for local experts); topk_ids [N, k]
    -> [N, D] in ``dtype``: the fp32 sum over s and the local j, rounded once."""
    splits, pairs, d = partials.shape
    n, k = topk_ids.shape
    if pairs != n * k:
        raise ValueError(f"moe_sum: partials hold {pairs} pair rows for topk_ids {tuple(topk_ids.shape)}")
    out = torch.empty(n, d, dtype=dtype, device=partials.device)
    if n == 0:
        return out
    ids = topk_ids if topk_ids.stride(-1) == 1 else topk_ids.contiguous()
    _moe_sum_kernel[(n, triton.cdiv(d, BLOCK_D))](
        partials, ids, out,
        d, expert_start, expert_start + num_local, partials.stride(0), partials.stride(1), ids.stride(0),
        out.stride(0),
        SPLITS=splits, TOP_K=k, BLOCK_D=BLOCK_D, num_warps=4, **pdl_args(partials, pdl),
    )
    return out

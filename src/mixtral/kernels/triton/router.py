"""Mixtral routing in one kernel (Triton): fp32 softmax over all experts, top-k, renormalise the k weights.

Same math as ``reference.route_topk``: ``probs = softmax(logits.float())``, the k largest probabilities in
descending order, each divided by their sum. Ties (equal probabilities) go to the lowest expert index first,
which is what torch.topk returns in practice; the reference does not promise an order among exact ties, so
tests compare ids only where the inputs have no ties. The exponential is Triton's (``tl.exp``), so weights
agree with PyTorch's to a few fp32 ulps, not bit for bit. NaN logits are not supported.

Each program takes BLOCK_N tokens as a [BLOCK_N, BLOCK_E] tile (E is 8 for Mixtral); top-k is k rounds of
(row max, lowest index holding it, knock it out). The grid depends only on N: CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixtral.kernels.triton.pdl import pdl_args, pdl_enter

BLOCK_N = 16  # tokens per program
MAX_EXPERTS = 1024


@triton.jit
def _route_topk_kernel(
    logits_ptr, w_ptr, ids_ptr,
    n_rows, n_experts, stride_l, stride_w, stride_i,
    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    cols = tl.arange(0, BLOCK_E)[None, :]  # [1, BE]
    row_ok = rows[:, None] < n_rows  # [BN, 1]
    col_ok = cols < n_experts  # [1, BE]
    rows64 = rows.to(tl.int64)[:, None]
    logits = tl.load(logits_ptr + rows64 * stride_l + cols, mask=row_ok & col_ok, other=0.0).to(tl.float32)
    logits = tl.where(col_ok, logits, float("-inf"))  # [BN, BE]; rows past N hold zeros: no 0/0 below
    row_max = tl.max(logits, axis=1)  # [BN]
    e = tl.where(col_ok, tl.exp(logits - row_max[:, None]), 0.0)  # [BN, BE]
    probs = e / tl.sum(e, axis=1)[:, None]
    probs = tl.where(col_ok, probs, -1.0)  # padding lanes never win (probabilities are >= 0)

    kk = tl.arange(0, BLOCK_K)[None, :]  # [1, BK]
    top_w = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    top_i = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(probs, axis=1)  # [BN]
        best_i = tl.min(tl.where(probs == best[:, None], cols, BLOCK_E), axis=1)  # lowest index among ties
        top_w = tl.where(kk == j, best[:, None], top_w)
        top_i = tl.where(kk == j, best_i[:, None], top_i)
        probs = tl.where(cols == best_i[:, None], -1.0, probs)
    top_w = top_w / tl.sum(top_w, axis=1)[:, None]  # lanes past TOP_K hold 0 and add nothing

    out_mask = row_ok & (kk < TOP_K)
    tl.store(w_ptr + rows64 * stride_w + kk, top_w, mask=out_mask)
    tl.store(ids_ptr + rows64 * stride_i + kk, top_i.to(tl.int64), mask=out_mask)


def route_topk_fused(router_logits: torch.Tensor, top_k: int, pdl: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [N, E] (any float dtype) -> (weights [N, k] fp32 summing to 1, ids [N, k] int64)."""
    if router_logits.dim() != 2:
        raise ValueError(f"route_topk: router_logits must be [N, E], got shape {tuple(router_logits.shape)}")
    n, n_experts = router_logits.shape
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"route_topk: top_k {top_k} must be in [1, num_experts = {n_experts}]")
    if n_experts > MAX_EXPERTS:
        raise ValueError(f"route_topk: {n_experts} experts exceed the {MAX_EXPERTS} one-tile limit")
    logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
    weights = torch.empty(n, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(n, top_k, dtype=torch.int64, device=logits.device)
    if n == 0:
        return weights, ids
    _route_topk_kernel[(triton.cdiv(n, BLOCK_N),)](
        logits, weights, ids,
        n, n_experts, logits.stride(0), weights.stride(0), ids.stride(0),
        TOP_K=top_k, BLOCK_N=BLOCK_N, BLOCK_E=triton.next_power_of_2(n_experts),
        BLOCK_K=triton.next_power_of_2(top_k), num_warps=2, **pdl_args(logits, pdl),
    )
    return weights, ids

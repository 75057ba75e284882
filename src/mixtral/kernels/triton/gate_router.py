"""The MoE router of a decode step in one kernel (Triton): the gate GEMM, Mixtral routing, and the expert
utilization counts.

At decode sizes the router is pure latency: ``x @ W_gate^T`` is a [N, 4096] x [4096, 8] product (cuBLAS runs
it as a split-K GEMV plus a reduction), then softmax/top-k and the counts' ``index_add`` are two more
launches. Here one program per token computes its logits with fp32 multiply-adds over one wide tile (a
16-row ``tl.dot`` version walked D in 16 dependent steps and took 11 us on an H100), rounds
them once to the model dtype like the Linear's output, routes exactly as ``router.py`` (fp32 softmax over
the rounded logits, top-k, renormalised; ties to the lowest expert) and adds each choice to the per-expert
counts with an atomic add (integers: the order does not matter), weighted by the row mask that leaves
CUDA-graph padding rows out. Grid from host ints only: capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixtral.kernels.triton.pdl import pdl_args, pdl_enter

# Wide enough that Mixtral's D = 4096 is one trip (all loads in flight at once; with 1024-wide tiles the four
# dependent trips made the kernel 8.7 us on an H100, the gate GEMV + top-k + index_add it replaces ~9 us).
BLOCK_D = 4096
MAX_EXPERTS = 64


@triton.jit
def _gate_route_kernel(
    x_ptr, w_ptr, logits_ptr, tw_ptr, ti_ptr, counts_ptr, mask_ptr,
    n_experts, D, stride_x, stride_w, stride_l, stride_tw, stride_ti,
    TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_MASK: tl.constexpr, PDL: tl.constexpr,
):
    """Program n: token n's E logits as fp32 multiply-adds over [E, BLOCK_D] tiles (no tensor cores: E is 8,
    and an fp32 model must get fp32 products, not TF32), then its routing and counts."""
    n = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)  # [BE]
    col_ok = cols < n_experts
    # The first (for Mixtral the only) weight tile is a constant: read it before waiting for the previous
    # kernel (PDL), so its ~64 KB arrive while the norm that produces x still runs.
    kd = tl.arange(0, BLOCK_D)  # [BD]
    k_ok = kd < D
    w_first = tl.load(w_ptr + cols[:, None] * stride_w + kd[None, :], mask=col_ok[:, None] & k_ok[None, :],
                      other=0.0)  # [BE, BD]
    pdl_enter(PDL)
    x_first = tl.load(x_ptr + n * stride_x + kd, mask=k_ok, other=0.0).to(tl.float32)  # [BD]
    acc = tl.sum(w_first.to(tl.float32) * x_first[None, :], axis=1)  # [BE]
    for k0 in range(BLOCK_D, D, BLOCK_D):
        kd = k0 + tl.arange(0, BLOCK_D)  # [BD]
        k_ok = kd < D
        xv = tl.load(x_ptr + n * stride_x + kd, mask=k_ok, other=0.0).to(tl.float32)  # [BD]
        wt = tl.load(w_ptr + cols[:, None] * stride_w + kd[None, :], mask=col_ok[:, None] & k_ok[None, :],
                     other=0.0).to(tl.float32)  # [BE, BD]
        acc += tl.sum(wt * xv[None, :], axis=1)
    logits = acc.to(logits_ptr.dtype.element_ty)  # the Linear's rounding
    tl.store(logits_ptr + n * stride_l + cols, logits, mask=col_ok)

    lf = tl.where(col_ok, logits.to(tl.float32), float("-inf"))  # [BE]
    e = tl.where(col_ok, tl.exp(lf - tl.max(lf, 0)), 0.0)
    probs = tl.where(col_ok, e / tl.sum(e, 0), -1.0)  # padding lanes never win
    if HAS_MASK:
        inc = tl.load(mask_ptr + n).to(tl.int64)  # 1 = count this row (0: CUDA-graph padding)
    else:
        inc = 1
    kk = tl.arange(0, BLOCK_K)  # [BK]
    top_w = tl.zeros([BLOCK_K], dtype=tl.float32)
    top_i = tl.zeros([BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(probs, 0)
        best_i = tl.min(tl.where(probs == best, cols, BLOCK_E), 0)  # lowest index among ties
        top_w = tl.where(kk == j, best, top_w)
        top_i = tl.where(kk == j, best_i, top_i)
        probs = tl.where(cols == best_i, -1.0, probs)
        if HAS_COUNTS:
            tl.atomic_add(counts_ptr + best_i, inc)
    top_w = top_w / tl.sum(top_w, 0)
    k_ok = kk < TOP_K
    tl.store(tw_ptr + n * stride_tw + kk, top_w, mask=k_ok)
    tl.store(ti_ptr + n * stride_ti + kk, top_i.to(tl.int64), mask=k_ok)


def gate_route_fused(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, counts: torch.Tensor | None = None,
                     mask: torch.Tensor | None = None, pdl: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, D], gate_weight [E, D] -> (router logits [N, E] in x's dtype, weights [N, k] fp32, ids [N, k] int64).

    ``counts`` [E] int64 (optional) gets += 1 per choice of each row whose ``mask`` [N] entry is 1 (all rows
    when ``mask`` is None).
    """
    n, d = x.shape
    n_experts = gate_weight.shape[0]
    if gate_weight.shape[1] != d:
        raise ValueError(f"gate_route: gate weight {tuple(gate_weight.shape)} does not fit x {tuple(x.shape)}")
    if not 1 <= top_k <= n_experts <= MAX_EXPERTS:
        raise ValueError(f"gate_route: need 1 <= top_k ({top_k}) <= num_experts ({n_experts}) <= {MAX_EXPERTS}")
    if counts is not None and (counts.shape != (n_experts,) or counts.dtype != torch.int64):
        raise ValueError(f"gate_route: counts must be [{n_experts}] int64, got {tuple(counts.shape)} {counts.dtype}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    w = gate_weight if gate_weight.stride(-1) == 1 else gate_weight.contiguous()
    logits = torch.empty(n, n_experts, dtype=x.dtype, device=x.device)
    weights = torch.empty(n, top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(n, top_k, dtype=torch.int64, device=x.device)
    if n == 0:
        return logits, weights, ids
    _gate_route_kernel[(n,)](
        x, w, logits, weights, ids, counts if counts is not None else ids, mask if mask is not None else ids,
        n_experts, d, x.stride(0), w.stride(0), logits.stride(0), weights.stride(0), ids.stride(0),
        TOP_K=top_k, BLOCK_E=triton.next_power_of_2(n_experts), BLOCK_K=triton.next_power_of_2(top_k),
        BLOCK_D=min(BLOCK_D, triton.next_power_of_2(d)),
        HAS_COUNTS=counts is not None, HAS_MASK=mask is not None, num_warps=16 if d >= 2048 else 4, **pdl_args(x, pdl),
    )
    return logits, weights, ids

"""The MoE router of a decode step in one kernel (Triton): the gate GEMM, Mixtral routing, and the expert
utilization counts.

At decode sizes the router is pure latency: ``x @ W_gate^T`` is a [N, 4096] x [4096, 8] product (cuBLAS runs
it as a split-K GEMV plus a reduction), then softmax/top-k and the counts' ``index_add`` are two more
launches. Here one program per BLOCK_N tokens computes the logits with ``tl.dot`` (fp32 accumulation,
rounded once to the model dtype like the Linear's output), routes exactly as ``router.py`` (fp32 softmax
over the rounded logits, top-k, renormalised; ties to the lowest expert) and adds each choice to the
per-expert counts with an atomic add (integers: the order does not matter), weighted by the row mask that
leaves CUDA-graph padding rows out. Grid from host ints only: capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 16  # tokens per program (tl.dot needs >= 16 rows)
BLOCK_D = 256
MAX_EXPERTS = 64


@triton.jit
def _gate_route_kernel(
    x_ptr, w_ptr, logits_ptr, tw_ptr, ti_ptr, counts_ptr, mask_ptr,
    n_rows, n_experts, D, stride_x, stride_w, stride_l, stride_tw, stride_ti,
    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_MASK: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_E)  # [BE]
    col_ok = cols < n_experts
    acc = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        kd = k0 + tl.arange(0, BLOCK_D)  # [BD]
        k_ok = kd < D
        xt = tl.load(x_ptr + rows64[:, None] * stride_x + kd[None, :], mask=row_ok[:, None] & k_ok[None, :],
                     other=0.0)  # [BN, BD]
        wt = tl.load(w_ptr + cols[None, :] * stride_w + kd[:, None], mask=col_ok[None, :] & k_ok[:, None],
                     other=0.0)  # [BD, BE] = W_gate^T tile
        acc = tl.dot(xt, wt, acc)
    logits = acc.to(logits_ptr.dtype.element_ty)  # the Linear's rounding
    out_ok = row_ok[:, None] & col_ok[None, :]
    tl.store(logits_ptr + rows64[:, None] * stride_l + cols[None, :], logits, mask=out_ok)

    lf = tl.where(col_ok[None, :], logits.to(tl.float32), float("-inf"))  # [BN, BE]
    row_max = tl.max(lf, axis=1)
    e = tl.where(col_ok[None, :], tl.exp(lf - row_max[:, None]), 0.0)
    probs = e / tl.sum(e, axis=1)[:, None]
    probs = tl.where(col_ok[None, :], probs, -1.0)  # padding lanes never win
    if HAS_MASK:
        inc = tl.load(mask_ptr + rows, mask=row_ok, other=0).to(tl.int64)  # [BN] 1 = count this row
    else:
        inc = tl.where(row_ok, 1, 0).to(tl.int64)
    kk = tl.arange(0, BLOCK_K)[None, :]  # [1, BK]
    top_w = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    top_i = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(probs, axis=1)  # [BN]
        best_i = tl.min(tl.where(probs == best[:, None], cols[None, :], BLOCK_E), axis=1)  # lowest among ties
        top_w = tl.where(kk == j, best[:, None], top_w)
        top_i = tl.where(kk == j, best_i[:, None], top_i)
        probs = tl.where(cols[None, :] == best_i[:, None], -1.0, probs)
        if HAS_COUNTS:
            tl.atomic_add(counts_ptr + best_i, inc, mask=row_ok)
    top_w = top_w / tl.sum(top_w, axis=1)[:, None]
    k_ok = row_ok[:, None] & (kk < TOP_K)
    tl.store(tw_ptr + rows64[:, None] * stride_tw + kk, top_w, mask=k_ok)
    tl.store(ti_ptr + rows64[:, None] * stride_ti + kk, top_i.to(tl.int64), mask=k_ok)


def gate_route_fused(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, counts: torch.Tensor | None = None,
                     mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    _gate_route_kernel[(triton.cdiv(n, BLOCK_N),)](
        x, w, logits, weights, ids, counts if counts is not None else ids, mask if mask is not None else ids,
        n, n_experts, d, x.stride(0), w.stride(0), logits.stride(0), weights.stride(0), ids.stride(0),
        TOP_K=top_k, BLOCK_N=BLOCK_N, BLOCK_E=max(16, triton.next_power_of_2(n_experts)),
        BLOCK_K=triton.next_power_of_2(top_k), BLOCK_D=BLOCK_D,
        HAS_COUNTS=counts is not None, HAS_MASK=mask is not None, num_warps=4, num_stages=3,
    )
    return logits, weights, ids

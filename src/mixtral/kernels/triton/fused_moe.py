"""Fused MoE experts in Triton: align, one grouped GEMM for w13 with SiLU·mul fused, one for w2 with the
routing weights applied, then the top-k sum.

Same contract as ``reference.moe_reference`` (``fused_moe(x, w13, w2, topk_weights, topk_ids,
expert_start)``). Pairs (token, slot) are sorted by expert and padded to ``BLOCK_M`` rows per expert
(moe_align.py); every program of a GEMM takes one block of ``BLOCK_M`` rows, all of one expert, and one tile
of output columns, so only the experts present in the routing have their weights read (batch 1-4 decode
touches 1-8 experts' weights, never all of them). The launch grid is sized from host ints only and
programs past the padded row count exit at once: no host sync, capturable in a CUDA graph.

Decode steps of a few tokens (at most ``min(BLOCK_M, E)`` pairs) skip the align launch: one block per pair,
the first pair of each expert takes all of that expert's pairs and the others exit (``layout_pairs``). On an
H200 the align kernel cost ~2.2 us of a ~220 us batch-1 layer.

Tile configs come from JSON files written by ``mixtral.bench.tune_moe`` (``configs/``), keyed by the nearest batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mixtral.kernels.triton.moe_align import moe_align
from mixtral.kernels.triton.moe_configs import GemmConfig, MoEConfig, get_config
from mixtral.kernels.triton.moe_sum import moe_sum
from mixtral.kernels.triton.pdl import pdl_args, pdl_enter


@triton.jit
def _block_rows(pid_m, sorted_ids_ptr, expert_ids_ptr, num_post_pad_ptr, topk_ids_ptr, num_pairs, expert_start,
                n_local, BLOCK_M: tl.constexpr, DIRECT: tl.constexpr):
    """Block pid_m's local expert (-1: nothing to do) and its rows: pair ids [BM] and which of them are real.

    Aligned (``moe_align``'s layout): block pid_m of the padded sorted rows. DIRECT (no align launch, for at
    most ``BLOCK_M`` pairs): block pid_m belongs to pair pid_m's expert if pid_m is that expert's first pair,
    and its rows are all the pairs routed to it, so each hit expert's weights are still read once."""
    if DIRECT:
        offs = tl.arange(0, BLOCK_M)  # [BM] every pair of the step
        in_range = offs < num_pairs
        ids = tl.load(topk_ids_ptr + offs, mask=in_range, other=-1)  # [BM] global expert ids
        mine = tl.load(topk_ids_ptr + pid_m)
        first = tl.sum(((ids == mine) & (offs < pid_m)).to(tl.int32), axis=0) == 0
        local = mine - expert_start
        e = tl.where(first & (local >= 0) & (local < n_local), local, -1).to(tl.int64)
        pair = offs
        row_ok = in_range & (ids == mine)
    else:
        offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        pair = tl.load(sorted_ids_ptr + offs).to(tl.int32)  # [BM] sentinel num_pairs on padding rows
        e = tl.where(pid_m * BLOCK_M < tl.load(num_post_pad_ptr), tl.load(expert_ids_ptr + pid_m), -1).to(tl.int64)
        row_ok = pair < num_pairs
    return e, pair, row_ok


@triton.jit
def _program_tile(sorted_ids_ptr, expert_ids_ptr, num_post_pad_ptr, topk_ids_ptr, num_pairs, expert_start, n_local,
                  N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT: tl.constexpr):
    """This program's tile of a grouped GEMM: its row block's local expert (-1: nothing to do), pair ids [BM]
    and which of them are real (``_block_rows`` of program_id 0), then its output columns [BN] and which of them
    are below N (program_id 1)."""
    e, pair, row_ok = _block_rows(tl.program_id(0), sorted_ids_ptr, expert_ids_ptr, num_post_pad_ptr, topk_ids_ptr,
                                  num_pairs, expert_start, n_local, BLOCK_M, DIRECT)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    return e, pair, row_ok, offs_n, offs_n < N


@triton.jit
def _w13_accumulate(a_ptrs, g_ptrs, u_ptrs, row_ok, n_ok, offs_k, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """gate, up [BM, BN] fp32: rows a_ptrs [BM, BK] times the w1 and w3 tiles g_ptrs, u_ptrs [BK, BN] over
    K = D, BLOCK_K at a time (loads masked to real rows and columns, and to D unless EVEN_K). The operands
    reach the MMA as loaded: bf16 / fp32 values, or FP8 codes whose scales the caller applies after."""
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            wg = tl.load(g_ptrs, mask=n_ok[None, :], other=0.0)
            wu = tl.load(u_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = offs_k + k0 < D
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wg = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            wu = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc_g = tl.dot(a, wg, acc_g)
        acc_u = tl.dot(a, wu, acc_u)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    return acc_g, acc_u


@triton.jit
def _w2_accumulate(a_ptrs, w_ptrs, row_ok, n_ok, offs_k, k_start, k_per_split, F, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """[BM, BN] fp32: rows a_ptrs [BM, BK] times the w2 tile w_ptrs [BK, BN] over this split's slice of F
    (offs_k starts at k_start), BLOCK_K at a time; operands into the MMA as loaded (see ``_w13_accumulate``)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, F), BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = offs_k + (k0 - k_start) < F
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def _w13_silu_kernel(
    x_ptr, w13_ptr, act_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_pad_ptr, topk_ids_ptr,
    num_pairs, F, D, expert_start, n_local,
    stride_xm, stride_we, stride_wn, stride_am,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, DIRECT: tl.constexpr, PDL: tl.constexpr,
):
    """act[pair, n] = silu(x[token] . w1[e, n]) * (x[token] . w3[e, n]) for one [BLOCK_M, BLOCK_N] tile."""
    pdl_enter(PDL)
    e, pair, row_ok, offs_n, n_ok = _program_tile(sorted_ids_ptr, expert_ids_ptr, num_post_pad_ptr, topk_ids_ptr,
                                                  num_pairs, expert_start, n_local, F, BLOCK_M, BLOCK_N, DIRECT)
    if e < 0:
        return
    token = tl.where(row_ok, pair // TOP_K, 0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)  # [BK]

    a_ptrs = x_ptr + token[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
    w_base = w13_ptr + e * stride_we
    g_ptrs = w_base + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BK, BN] w1 rows
    u_ptrs = g_ptrs + F * stride_wn  # w3 rows follow the F rows of w1
    acc_g, acc_u = _w13_accumulate(a_ptrs, g_ptrs, u_ptrs, row_ok, n_ok, offs_k, D, BLOCK_M, BLOCK_N, BLOCK_K,
                                   EVEN_K)
    act = acc_g * tl.sigmoid(acc_g) * acc_u  # SiLU(gate) * up in fp32
    out_ptrs = act_ptr + pair[:, None].to(tl.int64) * stride_am + offs_n[None, :]
    tl.store(out_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _w2_weighted_kernel(
    act_ptr, w2_ptr, out_ptr, topk_weights_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_pad_ptr, topk_ids_ptr,
    num_pairs, D, F, k_per_split, expert_start, n_local,
    stride_am, stride_we, stride_wn, stride_os, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    DIRECT: tl.constexpr, PDL: tl.constexpr,
):
    """out[split, pair, n] = topk_weight[pair] * (act[pair] . w2[e, n]) over this split's slice of F, for one
    [BLOCK_M, BLOCK_N] tile. Splitting F (split-K) gives small batches enough programs to fill the GPU."""
    pdl_enter(PDL)
    pid_k = tl.program_id(2)
    e, pair, row_ok, offs_n, n_ok = _program_tile(sorted_ids_ptr, expert_ids_ptr, num_post_pad_ptr, topk_ids_ptr,
                                                  num_pairs, expert_start, n_local, D, BLOCK_M, BLOCK_N, DIRECT)
    if e < 0:
        return
    pair64 = tl.where(row_ok, pair, 0).to(tl.int64)
    k_start = pid_k * k_per_split
    offs_k = k_start + tl.arange(0, BLOCK_K)

    a_ptrs = act_ptr + pair64[:, None] * stride_am + offs_k[None, :]  # [BM, BK]
    w_ptrs = w2_ptr + e * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BK, BN]
    acc = _w2_accumulate(a_ptrs, w_ptrs, row_ok, n_ok, offs_k, k_start, k_per_split, F, BLOCK_M, BLOCK_N, BLOCK_K,
                         EVEN_K)
    weight = tl.load(topk_weights_ptr + pair64, mask=row_ok, other=0.0).to(tl.float32)  # [BM]
    acc = acc * weight[:, None]
    out_ptrs = out_ptr + pid_k * stride_os + pair64[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def _check(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
           topk_ids: torch.Tensor) -> None:
    n, d = x.shape
    e, two_f, d13 = w13.shape
    if d13 != d or two_f % 2 or w2.shape != (e, d, two_f // 2):
        raise ValueError(f"fused_moe: x {tuple(x.shape)}, w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} "
                         "do not fit x [N, D], w13 [E, 2F, D], w2 [E, D, F]")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != n:
        raise ValueError(f"fused_moe: topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [N={n}, k]")
    if w13.stride(-1) != 1 or w2.stride(-1) != 1:
        raise ValueError("fused_moe: expert weights must be contiguous in their last dim")


@dataclass(frozen=True)
class PairLayout:
    """Which rows each GEMM program block takes: ``moe_align``'s sorted, padded blocks, or (``direct``) one
    block per pair read straight from ``topk_ids``, with no align launch (see ``layout_pairs``)."""

    topk_ids: torch.Tensor  # [N, k] global ids, contiguous
    expert_start: int
    num_local: int
    sorted_ids: torch.Tensor | None = None  # moe_align's outputs (None when direct)
    expert_ids: torch.Tensor | None = None
    num_post_pad: torch.Tensor | None = None

    @property
    def direct(self) -> bool:
        return self.sorted_ids is None

    @property
    def num_blocks(self) -> int:
        """Grid size along the row blocks, from host ints only."""
        return self.topk_ids.numel() if self.expert_ids is None else self.expert_ids.shape[0]

    def kernel_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sorted_ids, expert_ids, num_post_pad, topk_ids) pointers; unused ones alias topk_ids."""
        ids = self.topk_ids
        if self.sorted_ids is None or self.expert_ids is None or self.num_post_pad is None:
            return ids, ids, ids, ids
        return self.sorted_ids, self.expert_ids, self.num_post_pad, ids


def direct_fits(num_pairs: int, num_local: int, block_m: int) -> bool:
    """Whether a step's pairs can skip the align launch: they fit one block of rows, and there are no more of
    them than the align layout's blocks (cdiv(pairs, block_m) + min(E, pairs)), so no extra programs run.
    Mixtral (8 experts, top-2): decode batches of 1-4 sequences."""
    return 0 < num_pairs <= min(block_m, num_local)


def layout_pairs(topk_ids: torch.Tensor, num_local: int, block_m: int, expert_start: int = 0,
                 direct: bool | None = None, pdl: bool = True) -> PairLayout:
    """The row layout of a step's (token, slot) pairs for ``invoke_w13`` / ``invoke_w2``: direct where it
    fits (``direct_fits``; ``direct`` forces either way), else ``moe_align``'s sorted blocks."""
    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    if direct is None:
        direct = direct_fits(ids.numel(), num_local, block_m)
    if direct:
        if ids.numel() > block_m:
            raise ValueError(f"direct layout needs at most block_m={block_m} pairs, got {ids.numel()}")
        return PairLayout(ids, expert_start, num_local)
    sorted_ids, expert_ids, num_post_pad = moe_align(ids, num_local, block_m, expert_start, pdl)
    return PairLayout(ids, expert_start, num_local, sorted_ids, expert_ids, num_post_pad)


def invoke_w13(x: torch.Tensor, w13: torch.Tensor, act: torch.Tensor, layout: PairLayout, top_k: int, block_m: int,
               cfg: GemmConfig, pdl: bool = True) -> None:
    """act [N*k, F] = silu(x w1^T) * (x w3^T) per pair, for the pairs of ``layout``."""
    f, d = w13.shape[1] // 2, x.shape[1]
    _w13_silu_kernel[(layout.num_blocks, triton.cdiv(f, cfg.block_n))](
        x, w13, act, *layout.kernel_args(),
        act.shape[0], f, d, layout.expert_start, layout.num_local,
        x.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
        TOP_K=top_k, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=d % cfg.block_k == 0,
        DIRECT=layout.direct, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_args(x, pdl),
    )


def invoke_w2(act: torch.Tensor, w2: torch.Tensor, out_partials: torch.Tensor, weights: torch.Tensor,
              layout: PairLayout, block_m: int, cfg: GemmConfig, pdl: bool = True) -> None:
    """out_partials [split_k, N*k, D] = weight * (act w2^T) per pair and slice of F; rows of pairs not laid
    out (other ranks' experts) are left untouched."""
    d, f = w2.shape[1], w2.shape[2]
    if out_partials.shape[0] != cfg.split_k:
        raise ValueError(f"out_partials has {out_partials.shape[0]} slices for split_k={cfg.split_k}")
    k_per_split = triton.cdiv(triton.cdiv(f, cfg.split_k), cfg.block_k) * cfg.block_k
    _w2_weighted_kernel[(layout.num_blocks, triton.cdiv(d, cfg.block_n), cfg.split_k)](
        act, w2, out_partials, weights, *layout.kernel_args(),
        act.shape[0], d, f, k_per_split, layout.expert_start, layout.num_local,
        act.stride(0), w2.stride(0), w2.stride(1), out_partials.stride(0), out_partials.stride(1),
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=f % cfg.block_k == 0,
        DIRECT=layout.direct, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_args(act, pdl),
    )


def w2_partials(num_pairs: int, dim: int, cfg: GemmConfig, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[split_k, N*k, D] output of the w2 GEMM: x's dtype unsplit, fp32 when split-K partial sums are added
    afterwards. Not zeroed: rows of other ranks' pairs are never written, and ``moe_sum`` skips them by id."""
    return torch.empty(cfg.split_k, num_pairs, dim, dtype=dtype if cfg.split_k == 1 else torch.float32,
                       device=device)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, expert_start: int = 0, config: MoEConfig | None = None,
              direct: bool | None = None, pdl: bool = True) -> torch.Tensor:
    """x [N, D]; w13 [E, 2F, D]; w2 [E, D, F]; topk_weights [N, k] fp32; topk_ids [N, k] global ids
    -> [N, D] in x's dtype: sum over each token's local experts of weight * w2(silu(w1 x) * w3 x).

    ``config`` overrides the tuned tile config (the tuning script uses it); ``direct`` forces the row layout
    (``layout_pairs``: None picks the align-free one for decode batches of a few tokens); ``pdl`` False launches
    every kernel without programmatic dependent launch (kernels/triton/pdl.py).
    """
    _check(x, w13, w2, topk_weights, topk_ids)
    n, d = x.shape
    e_local, two_f, _ = w13.shape
    f = two_f // 2
    top_k = topk_ids.shape[1]
    if n == 0:
        return x.new_zeros(n, d)
    cfg = config or get_config(e_local, f, d, n, x.dtype, x.device)
    x = x if x.stride(-1) == 1 else x.contiguous()
    weights = topk_weights.reshape(-1).float().contiguous()  # [N*k] fp32, as the reference applies them
    layout = layout_pairs(topk_ids, e_local, cfg.block_m, expert_start, direct, pdl)
    act = torch.empty(n * top_k, f, dtype=x.dtype, device=x.device)  # [N*k, F] by pair
    invoke_w13(x, w13, act, layout, top_k, cfg.block_m, cfg.w13, pdl)
    partials = w2_partials(n * top_k, d, cfg.w2, x.dtype, x.device)  # [S, N*k, D]
    invoke_w2(act, w2, partials, weights, layout, cfg.block_m, cfg.w2, pdl)
    # Top-k (and split-K) reduction: [S, N*k, D] -> [N, D], accumulated in fp32, rounded once (one kernel).
    return moe_sum(partials, topk_ids, expert_start, e_local, x.dtype, pdl)

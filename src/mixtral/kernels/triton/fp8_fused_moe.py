"""The decode MoE in FP8: fused_moe.py's layout and epilogue, with FP8 codes into the MMA and scales after it.

Same contract and row layout as ``fused_moe.fused_moe`` (pairs sorted by expert, or laid out directly for a
few tokens; only the experts hit have their weights read), reusing its pieces: ``layout_pairs`` and the
kernels' ``_program_tile`` and K loops (``_w13_accumulate``, ``_w2_accumulate``: the FP8 codes go
into the MMA as loaded), ``w2_partials`` and ``moe_sum``. The steps:

1. x [N, D] -> per-token codes and scales (``fp8_quant.quantize_rows``; a static input scale if given);
2. w13: act[pair] = silu(g) * u with g, u = x_scale[token] * w_scale[e, n] * (codes . w13 codes[e, n]),
   in fp32, stored in x's dtype [N*k, F];
3. act -> per-pair codes and scales (the second ``quantize_rows``);
4. w2: partial[pair] = topk_weight * act_scale[pair] * w2_scale[e, n] * (act codes . w2 codes[e, n]),
   split over F when the config says so; ``moe_sum`` adds a token's pairs and slices in fp32.

Both quantizations are launches of their own (see fp8_quant.py for why): at batch 1 each reads and writes
a few tens of KB against the ~176 MB of FP8 expert weights a layer reads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixtral.kernels.triton.fp8_quant import quantize_rows
from mixtral.kernels.triton.fused_moe import (
    PairLayout,
    _program_tile,
    _w2_accumulate,
    _w13_accumulate,
    layout_pairs,
    w2_partials,
)
from mixtral.kernels.triton.moe_configs import GemmConfig, MoEConfig
from mixtral.kernels.triton.moe_sum import moe_sum
from mixtral.kernels.triton.pdl import pdl_args, pdl_enter
from mixtral.quant.fp8 import FP8


@triton.jit
def _fp8_w13_kernel(
    x_ptr, x_scale_ptr, w13_ptr, w13_scale_ptr, act_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_pad_ptr,
    topk_ids_ptr, num_pairs, F, D, expert_start, n_local,
    stride_xm, stride_we, stride_wn, stride_se, stride_am,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, DIRECT: tl.constexpr, PDL: tl.constexpr,
):
    """act[pair, n] = silu(gate) * up for one [BLOCK_M, BLOCK_N] tile, gate and up scaled after the MMA."""
    pdl_enter(PDL)
    e, pair, row_ok, offs_n, n_ok = _program_tile(sorted_ids_ptr, expert_ids_ptr, num_post_pad_ptr, topk_ids_ptr,
                                                  num_pairs, expert_start, n_local, F, BLOCK_M, BLOCK_N, DIRECT)
    if e < 0:
        return
    token = tl.where(row_ok, pair // TOP_K, 0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)  # [BK]

    a_ptrs = x_ptr + token[:, None] * stride_xm + offs_k[None, :]  # [BM, BK] fp8 codes
    g_ptrs = w13_ptr + e * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BK, BN] w1
    u_ptrs = g_ptrs + F * stride_wn  # w3 rows follow the F rows of w1
    acc_g, acc_u = _w13_accumulate(a_ptrs, g_ptrs, u_ptrs, row_ok, n_ok, offs_k, D, BLOCK_M, BLOCK_N, BLOCK_K,
                                   EVEN_K)
    x_scale = tl.load(x_scale_ptr + token, mask=row_ok, other=0.0)  # [BM] the token's scale
    s_base = w13_scale_ptr + e * stride_se
    g_scale = tl.load(s_base + offs_n, mask=n_ok, other=0.0)  # [BN] w1 rows' scales
    u_scale = tl.load(s_base + F + offs_n, mask=n_ok, other=0.0)  # [BN] w3 rows' scales
    gate = acc_g * x_scale[:, None] * g_scale[None, :]
    up = acc_u * x_scale[:, None] * u_scale[None, :]
    act = gate * tl.sigmoid(gate) * up  # SiLU(gate) * up in fp32
    out_ptrs = act_ptr + pair[:, None].to(tl.int64) * stride_am + offs_n[None, :]
    tl.store(out_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _fp8_w2_kernel(
    act_ptr, act_scale_ptr, w2_ptr, w2_scale_ptr, out_ptr, topk_weights_ptr, sorted_ids_ptr, expert_ids_ptr,
    num_post_pad_ptr, topk_ids_ptr, num_pairs, D, F, k_per_split, expert_start, n_local,
    stride_am, stride_we, stride_wn, stride_se, stride_os, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    DIRECT: tl.constexpr, PDL: tl.constexpr,
):
    """out[split, pair, n] = weight * act_scale[pair] * w2_scale[e, n] * (act codes . w2 codes[e, n]) over
    this split's slice of F, for one [BLOCK_M, BLOCK_N] tile (the scales are per row and column, so each
    split's partial sum can be scaled on its own)."""
    pdl_enter(PDL)
    pid_k = tl.program_id(2)
    e, pair, row_ok, offs_n, n_ok = _program_tile(sorted_ids_ptr, expert_ids_ptr, num_post_pad_ptr, topk_ids_ptr,
                                                  num_pairs, expert_start, n_local, D, BLOCK_M, BLOCK_N, DIRECT)
    if e < 0:
        return
    pair64 = tl.where(row_ok, pair, 0).to(tl.int64)
    k_start = pid_k * k_per_split
    offs_k = k_start + tl.arange(0, BLOCK_K)

    a_ptrs = act_ptr + pair64[:, None] * stride_am + offs_k[None, :]  # [BM, BK] fp8 codes
    w_ptrs = w2_ptr + e * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BK, BN]
    acc = _w2_accumulate(a_ptrs, w_ptrs, row_ok, n_ok, offs_k, k_start, k_per_split, F, BLOCK_M, BLOCK_N, BLOCK_K,
                         EVEN_K)
    row_scale = tl.load(topk_weights_ptr + pair64, mask=row_ok, other=0.0).to(tl.float32)  # [BM] routing weight
    row_scale *= tl.load(act_scale_ptr + pair64, mask=row_ok, other=0.0)  # times the act row's scale
    w_scale = tl.load(w2_scale_ptr + e * stride_se + offs_n, mask=n_ok, other=0.0)  # [BN]
    acc = acc * row_scale[:, None] * w_scale[None, :]
    out_ptrs = out_ptr + pid_k * stride_os + pair64[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def default_fp8_config(num_tokens: int) -> MoEConfig:
    """Untuned FP8 tiles: the bf16 defaults with reductions at least 32 deep (the FP8 MMA's k)."""
    if num_tokens <= 32:
        return MoEConfig(16, GemmConfig(64, 128, 4, 4), GemmConfig(64, 128, 4, 4))
    if num_tokens <= 256:
        return MoEConfig(32, GemmConfig(64, 128, 4, 4), GemmConfig(64, 128, 4, 4))
    return MoEConfig(64, GemmConfig(128, 128, 8, 3), GemmConfig(128, 128, 8, 3))


def fp8_config(e_local: int, f: int, d: int, num_tokens: int, device: torch.device) -> MoEConfig:
    """The decode tiles: the device's bf16 table where one exists (the same rows and columns at half the
    bytes; FP8 tables written by a tuner with the "fp8_" prefix would come first), else ``default_fp8_config``.
    A bf16 entry with a reduction tile below 32 is replaced by the default."""
    from mixtral.kernels.triton.moe_configs import _tuned

    cfg = (_tuned(e_local, f, d, num_tokens, FP8, device, "fp8_")
           or _tuned(e_local, f, d, num_tokens, torch.bfloat16, device, ""))
    if cfg is None or min(cfg.w13.block_k, cfg.w2.block_k) < 32:
        return default_fp8_config(num_tokens)
    return cfg


def invoke_fp8_w13(xq: torch.Tensor, x_scale: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor,
                   act: torch.Tensor, layout: PairLayout, top_k: int, block_m: int, cfg: GemmConfig,
                   pdl: bool = True) -> None:
    """act [N*k, F] (x's dtype) = silu(gate) * up per pair, for the pairs of ``layout``."""
    f, d = w13.shape[1] // 2, xq.shape[1]
    _fp8_w13_kernel[(layout.num_blocks, triton.cdiv(f, cfg.block_n))](
        xq, x_scale, w13, w13_scale, act, *layout.kernel_args(),
        act.shape[0], f, d, layout.expert_start, layout.num_local,
        xq.stride(0), w13.stride(0), w13.stride(1), w13_scale.stride(0), act.stride(0),
        TOP_K=top_k, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=d % cfg.block_k == 0,
        DIRECT=layout.direct, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_args(xq, pdl),
    )


def invoke_fp8_w2(aq: torch.Tensor, a_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor,
                  out_partials: torch.Tensor, weights: torch.Tensor, layout: PairLayout, block_m: int,
                  cfg: GemmConfig, pdl: bool = True) -> None:
    """out_partials [split_k, N*k, D] = weight * act w2^T per pair and slice of F."""
    d, f = w2.shape[1], w2.shape[2]
    k_per_split = triton.cdiv(triton.cdiv(f, cfg.split_k), cfg.block_k) * cfg.block_k
    _fp8_w2_kernel[(layout.num_blocks, triton.cdiv(d, cfg.block_n), cfg.split_k)](
        aq, a_scale, w2, w2_scale, out_partials, weights, *layout.kernel_args(),
        aq.shape[0], d, f, k_per_split, layout.expert_start, layout.num_local,
        aq.stride(0), w2.stride(0), w2.stride(1), w2_scale.stride(0), out_partials.stride(0), out_partials.stride(1),
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=f % cfg.block_k == 0,
        DIRECT=layout.direct, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_args(aq, pdl),
    )


def fp8_fused_moe(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                  w2_scale: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, expert_start: int = 0,
                  a13_scale: torch.Tensor | None = None, a2_scale: torch.Tensor | None = None,
                  config: MoEConfig | None = None, direct: bool | None = None, pdl: bool = True) -> torch.Tensor:
    """x [N, D]; w13 codes [E, 2F, D] fp8 with w13_scale [E, 2F]; w2 codes [E, D, F] with w2_scale [E, D];
    topk_weights [N, k] fp32; topk_ids [N, k] global ids; a13_scale / a2_scale: static input scales (one
    element) or None (per token) -> [N, D] in x's dtype, as ``quant.fp8.qmoe_reference``."""
    n, d = x.shape
    e_local, two_f, d13 = w13.shape
    f = two_f // 2
    if (d13 != d or w2.shape != (e_local, d, f) or w13_scale.shape != (e_local, two_f)
            or w2_scale.shape != (e_local, d) or w13.dtype != FP8 or w2.dtype != FP8):
        raise ValueError(f"fp8_fused_moe: x {tuple(x.shape)}, w13 {tuple(w13.shape)} {w13.dtype} (scale "
                         f"{tuple(w13_scale.shape)}), w2 {tuple(w2.shape)} {w2.dtype} (scale {tuple(w2_scale.shape)}) "
                         "do not fit x [N, D], fp8 w13 [E, 2F, D] / [E, 2F], fp8 w2 [E, D, F] / [E, D]")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != n:
        raise ValueError(f"fp8_fused_moe: topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [N={n}, k]")
    if n == 0:
        return x.new_zeros(0, d)
    top_k = topk_ids.shape[1]
    cfg = config or fp8_config(e_local, f, d, n, x.device)
    xq, x_scale = quantize_rows(x, a13_scale, pdl=pdl)  # [N, D] fp8, [N]
    weights = topk_weights.reshape(-1).float().contiguous()  # [N*k]
    layout = layout_pairs(topk_ids, e_local, cfg.block_m, expert_start, direct, pdl)
    act = torch.empty(n * top_k, f, dtype=x.dtype, device=x.device)  # [N*k, F] by pair
    invoke_fp8_w13(xq, x_scale, w13, w13_scale, act, layout, top_k, cfg.block_m, cfg.w13, pdl)
    # Rows of pairs routed to other ranks' experts were never written: skipped, and never read by w2.
    aq, a_scale = quantize_rows(act, a2_scale, row_experts=(layout.topk_ids.view(-1), expert_start,
                                                             expert_start + e_local), pdl=pdl)  # [N*k, F] fp8, [N*k]
    partials = w2_partials(n * top_k, d, cfg.w2, x.dtype, x.device)  # [S, N*k, D]
    invoke_fp8_w2(aq, a_scale, w2, w2_scale, partials, weights, layout, cfg.block_m, cfg.w2, pdl)
    return moe_sum(partials, topk_ids, expert_start, e_local, x.dtype, pdl)

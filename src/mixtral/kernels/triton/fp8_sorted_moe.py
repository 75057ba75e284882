"""The prefill MoE in FP8: sorted_moe.py's grouped GEMMs over rows gathered into expert order, with FP8
codes loaded by TMA into the FP8 MMA and the per-row and per-column scales applied in the epilogue.

Same contract as ``sorted_moe.sorted_moe`` and the same row layout, reusing its tile walk (``_tile_of``:
expert-major, then column tile, then row tile; a group's short last block as a ``small_m`` tile), its pair
sort and its combine. The steps:

1. x [N, D] -> per-token codes and scales (``fp8_quant.quantize_rows``), then the codes gathered into
   sorted order as bytes ([P, D], half the bytes of gathering bf16 rows);
2. w13: act[r] = silu(g) * u, g and u = x_scale[r] * w_scale[e, n] * (codes . w codes) in fp32, stored in x's
   dtype [P, F];
3. act -> per-row codes and scales (rows past the local pairs are other ranks': never multiplied);
4. w2: y[r] = act_scale[r] * w2_scale[e, n] * (act codes . w2 codes), stored in x's dtype [P, D];
5. ``combine``: per token the fp32 sum of routing weight * its rows.

Not carried over from the bf16 kernels (their configs are refused here): ``joint`` (one MMA for w1 and w3),
``pair_small`` and ``persistent``; each was a few percent on bf16 and needs its own FP8 measurement.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixtral.kernels.triton.fp8_quant import quantize_rows
from mixtral.kernels.triton.moe_configs import GemmConfig, MoEConfig
from mixtral.kernels.triton.moe_glue import check_contract, combine, sort_pairs
from mixtral.kernels.triton.pdl import pdl_args, pdl_enter
from mixtral.kernels.triton.sorted_moe import _has_tma, _operand, _tile_of
from mixtral.quant.fp8 import FP8


@triton.jit
def _fp8_tile(a, w, out_ptr, a_scale_ptr, w_scale_ptr, row0, row_end, w_row, up_row, n0, P, K, stride_am, stride_wr,
              stride_om, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GATED: tl.constexpr,
              STAGES: tl.constexpr, USE_TMA: tl.constexpr):
    """out[row0 : row0 + ROWS (< row_end), n0 : n0 + BLOCK_N] = a_scale[r] * w_scale[w row] * (a . w^T), the
    weight rows from w_row (their scales at the same index of ``w_scale_ptr``); GATED (w13) makes it
    silu(gate) * up with the w3 rows from up_row."""
    rows = row0 + tl.arange(0, ROWS)  # [ROWS]
    cols = tl.arange(0, BLOCK_N)  # [BN]
    ks = tl.arange(0, BLOCK_K)  # [BK]
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        if USE_TMA:
            a_t = a.load([row0, k0])  # [ROWS, BK] fp8; rows past P read as zeros
            w_t = w.load([w_row, k0])  # [BN, BK]
            if GATED:
                wu = w.load([up_row, k0])
        else:
            a_t = tl.load(a + rows[:, None].to(tl.int64) * stride_am + (k0 + ks)[None, :],
                          mask=(rows < P)[:, None], other=0.0)
            w_t = tl.load(w + (w_row + cols)[:, None].to(tl.int64) * stride_wr + (k0 + ks)[None, :])
            if GATED:
                wu = tl.load(w + (up_row + cols)[:, None].to(tl.int64) * stride_wr + (k0 + ks)[None, :])
        acc = tl.dot(a_t, w_t.T, acc)
        if GATED:
            acc_u = tl.dot(a_t, wu.T, acc_u)
    row_ok = rows < row_end
    a_scale = tl.load(a_scale_ptr + rows, mask=row_ok, other=0.0)  # [ROWS]
    acc = acc * a_scale[:, None] * tl.load(w_scale_ptr + w_row + cols)[None, :]
    if GATED:
        up = acc_u * a_scale[:, None] * tl.load(w_scale_ptr + up_row + cols)[None, :]
        acc = acc * tl.sigmoid(acc) * up  # SiLU(gate) * up on the scaled fp32 sums, rounded once below
    ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + (n0 + cols)[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _fp8_sorted_kernel(
    a, a_small, w, out_ptr, a_scale_ptr, w_scale_ptr, offs_ptr, P, W_ROWS, UP_OFFSET, K, stride_am, stride_wr,
    stride_om, E: tl.constexpr, N_TILES: tl.constexpr, BLOCK_M: tl.constexpr, SMALL_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GATED: tl.constexpr, STAGES: tl.constexpr,
    USE_TMA: tl.constexpr, PDL: tl.constexpr,
):
    """One [BLOCK_M or SMALL_M, BLOCK_N] tile of expert e (see ``sorted_moe._sorted_kernel``): ``a`` the
    row codes [P, K], ``w`` the weight codes as [E * W_ROWS, K] rows, scales per row and per weight row."""
    pdl_enter(PDL)
    expert, row0, row_end, n_tile, small = _tile_of(tl.program_id(0), offs_ptr, N_TILES, E, BLOCK_M, SMALL_M, False)
    if expert >= E:
        return
    n0 = n_tile * BLOCK_N
    w_row = expert * W_ROWS + n0  # first weight row of this column tile (w1's for GATED)
    if SMALL_M < BLOCK_M and small != 0:
        _fp8_tile(a_small, w, out_ptr, a_scale_ptr, w_scale_ptr, row0, row_end, w_row, w_row + UP_OFFSET, n0, P, K,
                  stride_am, stride_wr, stride_om, SMALL_M, BLOCK_N, BLOCK_K, GATED, STAGES, USE_TMA)
    else:
        _fp8_tile(a, w, out_ptr, a_scale_ptr, w_scale_ptr, row0, row_end, w_row, w_row + UP_OFFSET, n0, P, K,
                  stride_am, stride_wr, stride_om, BLOCK_M, BLOCK_N, BLOCK_K, GATED, STAGES, USE_TMA)


def default_fp8_sorted_config() -> MoEConfig:
    """Untuned prefill tiles: 128 x 128 with a 128-deep reduction (128 bytes of FP8 a row, the bf16 tile's
    bytes), 8 warps; short last blocks of up to 64 rows take a 64-row tile."""
    return MoEConfig(128, GemmConfig(128, 128, 8, 3), GemmConfig(128, 128, 8, 4), small_m=64)


def fp8_layout_problem(d: int, f: int, cfg: MoEConfig) -> str | None:
    """Why these shapes and tiles cannot run here (None when they can): tiles never straddle an expert's rows
    or the reduction's end, FP8 MMAs reduce at least 32 deep, and the bf16-only options are refused."""
    for what, size, tile in (("F", f, cfg.w13.block_n), ("D", d, cfg.w13.block_k), ("D", d, cfg.w2.block_n),
                             ("F", f, cfg.w2.block_k)):
        if size % tile:
            return f"{what}={size} is not a multiple of the tile {tile}"
    if min(cfg.w13.block_k, cfg.w2.block_k) < 32:
        return f"reduction tiles {cfg.w13.block_k} / {cfg.w2.block_k} must be at least 32 deep for FP8 MMAs"
    for name, g in (("w13", cfg.w13), ("w2", cfg.w2)):
        if g.joint or g.pair_small or g.persistent:
            return f"{name}: joint, pair_small and persistent tiles have no FP8 kernel"
    if cfg.small_m and (cfg.small_m >= cfg.block_m or cfg.small_m < 16 or cfg.small_m & (cfg.small_m - 1)):
        return f"small_m={cfg.small_m} must be a power of two from 16 to below block_m={cfg.block_m}"
    if d % 16 or f % 16:
        return f"D={d} and F={f} rows must be 16-byte aligned for TMA"
    return None


def _gemm(gated: bool, a: torch.Tensor, a_scale: torch.Tensor, w_rows: torch.Tensor, w_scale: torch.Tensor,
          out: torch.Tensor, offs: torch.Tensor, rows_per_expert: int, up_offset: int, n_tiles: int, e_local: int,
          cfg: MoEConfig, tile: GemmConfig, use_tma: bool, pdl: bool = True) -> None:
    small = cfg.small_m or cfg.block_m
    a_big = _operand(a, [cfg.block_m, tile.block_k], use_tma)
    a_small = _operand(a, [small, tile.block_k], use_tma) if small != cfg.block_m else a_big
    w_tiles = _operand(w_rows, [tile.block_n, tile.block_k], use_tma)
    grid = ((triton.cdiv(a.shape[0], cfg.block_m) + e_local) * n_tiles,)  # an upper bound: groups end mid-tile
    _fp8_sorted_kernel[grid](
        a_big, a_small, w_tiles, out, a_scale, w_scale, offs, a.shape[0], rows_per_expert, up_offset, a.shape[1],
        a.stride(0), w_rows.stride(0), out.stride(0), E=e_local, N_TILES=n_tiles, BLOCK_M=cfg.block_m,
        SMALL_M=small, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, GATED=gated, STAGES=tile.num_stages,
        USE_TMA=use_tma, num_warps=tile.num_warps, num_stages=tile.num_stages, **pdl_args(a, pdl),
    )


def gather_rows(codes: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """codes [N, K] fp8 -> codes[index] [P, K], moved as bytes (index_select on the uint8 view)."""
    return codes.view(torch.uint8).index_select(0, index).view(FP8)


def fp8_sorted_moe(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                   w2_scale: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, expert_start: int = 0,
                   a13_scale: torch.Tensor | None = None, a2_scale: torch.Tensor | None = None,
                   config: MoEConfig | None = None, use_tma: bool | None = None, pdl: bool = True) -> torch.Tensor:
    """x [N, D]; w13 codes [E, 2F, D] with w13_scale [E, 2F]; w2 codes [E, D, F] with w2_scale [E, D];
    topk_weights [N, k] fp32; topk_ids [N, k] global ids; a13_scale / a2_scale static input scales or None
    -> [N, D] in x's dtype, as ``quant.fp8.qmoe_reference``. ``use_tma`` None: where the device has it."""
    check_contract(x, w13, w2, topk_weights, topk_ids)
    n, d = x.shape
    e_local, two_f, _ = w13.shape
    f = two_f // 2
    if w13.dtype != FP8 or w2.dtype != FP8 or w13_scale.shape != (e_local, two_f) or w2_scale.shape != (e_local, d):
        raise ValueError(f"fp8_sorted_moe: w13 {w13.dtype} (scale {tuple(w13_scale.shape)}) and w2 {w2.dtype} (scale "
                         f"{tuple(w2_scale.shape)}) must be fp8 codes with scales [E, 2F] and [E, D]")
    cfg = config or default_fp8_sorted_config()
    problem = fp8_layout_problem(d, f, cfg)
    if problem is not None:
        raise ValueError(f"fp8_sorted_moe: {problem}")
    if not (w13.is_contiguous() and w2.is_contiguous()):
        raise ValueError("fp8_sorted_moe: w13 and w2 must be contiguous (they are read as [E * rows, K] matrices)")
    if n == 0:
        return x.new_zeros(0, d)
    use_tma = _has_tma(x.device) if use_tma is None else use_tma
    k = topk_ids.shape[1]
    order, row_of_pair, offs = sort_pairs(topk_ids, e_local, expert_start, pdl)  # [P], [P], [E]
    num_local = offs[-1:]  # [1] rows from here on are other ranks' pairs: never multiplied
    xq, x_scale = quantize_rows(x, a13_scale, pdl=pdl)  # [N, D] fp8, [N]
    tokens = order // k
    xs, xs_scale = gather_rows(xq, tokens), x_scale.index_select(0, tokens)  # [P, D], [P] in sorted order
    act = torch.empty(xs.shape[0], f, dtype=x.dtype, device=x.device)  # [P, F]
    _gemm(True, xs, xs_scale, w13.view(e_local * two_f, d), w13_scale.reshape(-1), act, offs, two_f, f,
          f // cfg.w13.block_n, e_local, cfg, cfg.w13, use_tma, pdl)
    aq, a_scale = quantize_rows(act, a2_scale, num_local, pdl=pdl)  # [P, F] fp8, [P]; other ranks' rows skipped
    y = torch.empty(xs.shape[0], d, dtype=x.dtype, device=x.device)  # [P, D] rows in sorted order
    _gemm(False, aq, a_scale, w2.view(e_local * d, f), w2_scale.reshape(-1), y, offs, d, 0, d // cfg.w2.block_n,
          e_local, cfg, cfg.w2, use_tma, pdl)
    return combine(y, row_of_pair, topk_weights, num_local, pdl)  # [N, D]

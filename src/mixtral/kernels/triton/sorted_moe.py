"""Prefill MoE as two Triton grouped GEMMs over rows already gathered into expert order, with TMA loads.

Same contract as ``reference.moe_reference`` and the decode kernel (``fused_moe.py``): x [N, D], w13 [E_local, 2F, D]
(w1 rows then w3 rows), w2 [E_local, D, F], topk_weights [N, k] fp32, topk_ids [N, k] global ids; pairs
whose expert lives on another expert-parallel rank add nothing.

Why another path: the decode kernel (``fused_moe.py``) gathers x rows by pair id inside the GEMM, so its A
operand cannot be a TMA load, and pads each expert to a block of rows. Here x is gathered once
(``moe_glue.sort_pairs`` + ``index_select``, ~1% of the FLOP time at 2048 tokens) so that both operands of both
GEMMs are contiguous 2-D tiles TMA can load, SiLU(gate) * up is applied to the fp32 accumulators before
anything is written (one [P, F] store instead of a [P, 2F] store and a second pass), and the tiles come
from a table tuned per device (``mixtral.bench.tune_sorted_moe``).

Tiles: an expert's rows start anywhere (groups are not padded), so a program's ``BLOCK_M`` rows may run past
its group into the next expert's rows; those are multiplied (TMA loads whole tiles) but never stored. A
group's last block of at most ``small_m`` rows (config) is multiplied as a ``small_m``-row tile instead (for w2,
with ``pair_small``, one spanning two column tiles, which keeps pace with the full tiles). The
program order is expert-major, then output-column tile, then row tile: the few row tiles of one expert that
share a weight tile run side by side, so each weight tile is read from HBM once and then from L2. The launch
grid is an upper bound from host ints (every expert may add one partial tile), programs past the real tile
count exit at once: no host sync. A GEMM whose config says ``persistent`` runs ``persistent_moe.py``'s kernel
instead (one program per SM walking the same tiles, without the short last tiles). A w13 config with ``joint``
multiplies a column tile's w1 and w3 rows as one operand, one MMA of twice the width a step (``_tile``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from mixtral.kernels.triton import moe_configs, persistent_moe
from mixtral.kernels.triton.moe_configs import GemmConfig, MoEConfig
from mixtral.kernels.triton.moe_glue import check_contract, combine, sort_pairs
from mixtral.kernels.triton.pdl import pdl_args, pdl_enter


@triton.jit
def _tile_of(pid, offs_ptr, N_TILES: tl.constexpr, E: tl.constexpr, BLOCK_M: tl.constexpr, SMALL_M: tl.constexpr,
             PAIR: tl.constexpr):
    """pid -> (expert, first row, group end row, column tile, small); expert == E past the last tile.

    Order: expert 0's tiles first; inside an expert, column tile major and row tile minor. Each group's rows
    are cut into BLOCK_M tiles; ``small`` marks a last partial tile of at most SMALL_M rows (SMALL_M <
    BLOCK_M), which the kernels multiply as a SMALL_M-row tile: a group of 530 rows costs four 128-row
    tiles and one 64-row tile instead of five 128-row tiles. It stays in the same launch, next to the big
    tiles that read the same weight tile, so the weights are still read from HBM once.

    With PAIR a short tile spans two column tiles (SMALL_M x 2 BLOCK_N: a big tile's work per reduction
    step), after the big tiles of both: order column pair, then the first column's big tiles, the second's,
    the short one. A SMALL_M x BLOCK_N tile would do half a big tile's work per step and run ahead of the
    big tiles that share its weight tile; over w2's long reduction, farther than L2 keeps that tile (w2 read
    26% more HBM than its weights and rows at 2048 tokens, ncu)."""
    expert = pid * 0 + E
    row0 = pid * 0
    row_end = pid * 0
    n_tile = pid * 0
    small = pid * 0
    start = pid * 0  # first row of expert e's group
    seen = pid * 0  # programs owned by experts before e
    for e in tl.static_range(E):
        end = tl.load(offs_ptr + e)
        count = end - start
        m_tiles = tl.cdiv(count, BLOCK_M)
        rem = count % BLOCK_M
        has_small = ((rem > 0) & (rem <= SMALL_M)).to(tl.int32)  # the last block takes a short tile
        local = pid - seen
        if PAIR:
            m_full = m_tiles - has_small
            per_pair = 2 * m_full + has_small  # tiles of one column pair
            size = per_pair * (N_TILES // 2)
            r = local % tl.maximum(per_pair, 1)
            second = (r >= m_full) & (r < 2 * m_full)
            is_small = r >= 2 * m_full
            m_idx = tl.where(is_small, m_full, tl.where(second, r - m_full, r))
            n_idx = 2 * (local // tl.maximum(per_pair, 1)) + second.to(tl.int32)
        else:
            size = m_tiles * N_TILES
            m_safe = tl.maximum(m_tiles, 1)
            m_idx = local % m_safe
            n_idx = local // m_safe
            is_small = (m_idx == m_tiles - 1) & (has_small != 0)
        hit = (local >= 0) & (local < size)
        expert = tl.where(hit, e, expert)
        row0 = tl.where(hit, start + m_idx * BLOCK_M, row0)
        n_tile = tl.where(hit, n_idx, n_tile)
        row_end = tl.where(hit, end, row_end)
        small = tl.where(hit, is_small.to(tl.int32), small)
        seen += size
        start = end
    return expert, row0, row_end, n_tile, small


@triton.jit
def _tile(a, w, w_joint, out_ptr, row0, row_end, w_row, up_row, w_plane, n0, P, K, stride_am, stride_wr, stride_om,
          ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GATED: tl.constexpr,
          PAIR: tl.constexpr, JOINT: tl.constexpr, STAGES: tl.constexpr, USE_TMA: tl.constexpr,
          WARP_SPECIALIZE: tl.constexpr):
    """out[row0 : row0 + ROWS (< row_end), n0 : n0 + BLOCK_N] = a . w^T summed over K in fp32, from weight
    rows w_row ...; with GATED (w13) silu(a . w1^T) * (a . w3^T), the w3 rows starting at up_row; with PAIR
    the next BLOCK_N columns too (their weight rows start at up_row = w_row + BLOCK_N). STAGES: the
    reduction loop's pipeline depth.

    JOINT (GATED only): the w1 and w3 tiles are one [2 BN, BK] operand, so each reduction step is one MMA
    of twice the width ([ROWS, 2 BN]: wgmma's n256 at BN 128) instead of two that each read the token tile
    again; ``w_joint`` is a TMA descriptor over w13 as [E * 2, F, D] with [2, BN, BK] blocks, read at plane
    ``w_plane`` = 2 e (w1's rows; w3's are plane 2 e + 1). Pointer loads gather the same rows from ``w``."""
    rows = row0 + tl.arange(0, ROWS)  # [ROWS]
    cols = tl.arange(0, BLOCK_N)  # [BN]
    ks = tl.arange(0, BLOCK_K)  # [BK]
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)  # the up projection (GATED) or the next columns (PAIR)
    acc_j = tl.zeros((ROWS, 2 * BLOCK_N), dtype=tl.float32)  # JOINT: [gate | up] columns
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES, warp_specialize=WARP_SPECIALIZE):
        if USE_TMA:
            a_t = a.load([row0, k0])  # [ROWS, BK]; rows past P read as zeros
        else:
            a_t = tl.load(a + rows[:, None].to(tl.int64) * stride_am + (k0 + ks)[None, :],
                          mask=(rows < P)[:, None], other=0.0)
        if JOINT:
            if USE_TMA:  # [2, BN, BK] -> [2 BN, BK]: w1 rows n0.., then w3 rows n0..
                w_j = w_joint.load([w_plane, n0, k0]).reshape(2 * BLOCK_N, BLOCK_K)
            else:
                jr = tl.arange(0, 2 * BLOCK_N)  # [2 BN]
                w_rows = tl.where(jr < BLOCK_N, w_row + jr, up_row + jr - BLOCK_N)
                w_j = tl.load(w + w_rows[:, None].to(tl.int64) * stride_wr + (k0 + ks)[None, :])
            acc_j = tl.dot(a_t, w_j.T, acc_j)
        else:
            if USE_TMA:
                w_t = w.load([w_row, k0])  # [BN, BK]
                if GATED or PAIR:
                    wu = w.load([up_row, k0])  # [BN, BK]
            else:
                w_t = tl.load(w + (w_row + cols)[:, None].to(tl.int64) * stride_wr + (k0 + ks)[None, :])
                if GATED or PAIR:
                    wu = tl.load(w + (up_row + cols)[:, None].to(tl.int64) * stride_wr + (k0 + ks)[None, :])
            acc = tl.dot(a_t, w_t.T, acc)
            if GATED or PAIR:
                acc_u = tl.dot(a_t, wu.T, acc_u)
    if JOINT:
        # [ROWS, 2 BN] -> [ROWS, BN, 2] -> gate, up; each thread's accumulator holds both halves' columns
        acc, acc_u = acc_j.reshape(ROWS, 2, BLOCK_N).permute(0, 2, 1).split()
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_u  # SiLU(gate) * up on the fp32 sums, rounded once below
    ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + (n0 + cols)[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows < row_end)[:, None])
    if PAIR:
        tl.store(ptrs + BLOCK_N, acc_u.to(out_ptr.dtype.element_ty), mask=(rows < row_end)[:, None])


@triton.jit
def _sorted_kernel(
    a, a_small, w, w_joint, out_ptr, offs_ptr, P, W_ROWS, UP_OFFSET, K, stride_am, stride_wr, stride_om,
    E: tl.constexpr, N_TILES: tl.constexpr, BLOCK_M: tl.constexpr, SMALL_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GATED: tl.constexpr, PAIR: tl.constexpr, JOINT: tl.constexpr, STAGES: tl.constexpr,
    SMALL_STAGES: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, PDL: tl.constexpr,
):
    """One [BLOCK_M or SMALL_M, BLOCK_N] tile of expert e: out[r, n] = a[r] . w[e, n] (w2), or with GATED
    (w13) silu(a[r] . w1[e, n]) * (a[r] . w3[e, n]). ``a`` / ``a_small`` are the rows [P, K] with BLOCK_M /
    SMALL_M-row blocks and ``w`` the weights as [E * W_ROWS, K] rows (w13: w1's F rows, then w3's from
    UP_OFFSET = F): TMA descriptors, or plain pointers with their row strides when USE_TMA is off. With
    PAIR (w2) a short tile is SMALL_M x 2 BLOCK_N (``_tile_of``), pipelined SMALL_STAGES deep (its stage
    holds twice the weight rows). With JOINT (w13) each step is one MMA over w1's and w3's tiles together,
    loaded through ``w_joint`` (``_tile``)."""
    pdl_enter(PDL)
    expert, row0, row_end, n_tile, small = _tile_of(tl.program_id(0), offs_ptr, N_TILES, E, BLOCK_M, SMALL_M,
                                                    PAIR)
    if expert >= E:
        return
    n0 = n_tile * BLOCK_N
    w_row = expert * W_ROWS + n0  # first weight row of this column tile (w1's for GATED)
    if SMALL_M < BLOCK_M and small != 0:
        _tile(a_small, w, w_joint, out_ptr, row0, row_end, w_row, w_row + (BLOCK_N if PAIR else UP_OFFSET),
              2 * expert, n0, P, K, stride_am, stride_wr, stride_om, SMALL_M, BLOCK_N, BLOCK_K, GATED, PAIR, JOINT,
              SMALL_STAGES, USE_TMA, WARP_SPECIALIZE)
    else:
        _tile(a, w, w_joint, out_ptr, row0, row_end, w_row, w_row + UP_OFFSET, 2 * expert, n0, P, K, stride_am,
              stride_wr, stride_om, BLOCK_M, BLOCK_N, BLOCK_K, GATED, False, JOINT, STAGES, USE_TMA,
              WARP_SPECIALIZE)


def layout_problem(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, cfg: MoEConfig) -> str | None:
    """Why this path cannot take these operands with these tiles (None when it can).

    Tiles never straddle an expert's weight rows or the reduction's end, so F and D must be multiples of
    the column and reduction tiles; the weights are read as one [E * rows, K] matrix, so they must be
    contiguous; TMA needs 16-byte aligned row strides."""
    if not (x.dtype == w13.dtype == w2.dtype) or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"x, w13 and w2 must share one float dtype, got {x.dtype}, {w13.dtype}, {w2.dtype}"
    d, f = x.shape[1], w2.shape[2]
    for what, size, tile in (("F", f, cfg.w13.block_n), ("D", d, cfg.w13.block_k), ("D", d, cfg.w2.block_n),
                             ("F", f, cfg.w2.block_k)):
        if size % tile:
            return f"{what}={size} is not a multiple of the tile {tile}"
    if cfg.w13.pair_small:
        return "pair_small is for w2 only (w13's short tiles already load two weight tiles a step)"
    if cfg.w2.joint:
        return "joint is for w13 only (it multiplies w1's and w3's tiles in one MMA)"
    if cfg.w2.pair_small and (not cfg.small_m or cfg.w2.persistent or (d // cfg.w2.block_n) % 2):
        return (f"w2: pair_small needs short tiles (small_m > 0, got {cfg.small_m}), a non-persistent tile and an "
                f"even number of column tiles (D={d} // {cfg.w2.block_n} = {d // cfg.w2.block_n})")
    if cfg.small_m and (cfg.small_m >= cfg.block_m or cfg.small_m < 16 or cfg.small_m & (cfg.small_m - 1)):
        return f"small_m={cfg.small_m} must be a power of two from 16 to below block_m={cfg.block_m}"
    if not (w13.is_contiguous() and w2.is_contiguous()):
        return "w13 and w2 must be contiguous (they are read as [E * rows, K] matrices)"
    if (d * x.element_size()) % 16 or (f * x.element_size()) % 16:
        return f"D={d} and F={f} rows must be 16-byte aligned for TMA"
    return None


@functools.lru_cache(maxsize=16)
def _has_tma(device: torch.device) -> bool:
    """Host-built TMA descriptors need sm90+ on CUDA; Triton's CPU interpreter emulates them."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device)[0] >= 9


def _operand(t: torch.Tensor, block: list[int], use_tma: bool) -> object:
    if not use_tma:
        return t
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, block)


SMEM_BYTES = 227 * 1024  # shared memory one Hopper block may use


def stage_bytes(rows: int, tile: GemmConfig, weight_tiles: int, elem: int = 2) -> int:
    """Shared memory of one pipeline stage: a ``rows`` x block_k token tile and ``weight_tiles`` weight tiles
    (w13 and paired short tiles load two)."""
    return elem * tile.block_k * (rows + weight_tiles * tile.block_n)


def _pair_stages(cfg: GemmConfig, small_m: int, elem: int) -> int:
    """Pipeline depth of a paired short tile (``small_m`` rows, two weight tiles a stage): the config's, or
    less where that many stages would not fit shared memory."""
    return max(1, min(cfg.num_stages, SMEM_BYTES // stage_bytes(small_m, cfg, 2, elem)))


def _gemm(gated: bool, a: torch.Tensor, w_rows: torch.Tensor, out: torch.Tensor, offs: torch.Tensor,
          rows_per_expert: int, up_offset: int, n_tiles: int, e_local: int, block_m: int, small_m: int,
          cfg: GemmConfig, use_tma: bool, pdl: bool) -> None:
    """One launch of either GEMM over every row of ``a`` [P, K] against ``w_rows`` [E * rows_per_expert, K]:
    the persistent kernel when the config asks for it (TMA only), else one program per ``block_m`` tile with
    each group's short last block (at most ``small_m`` rows, when ``small_m`` > 0) in a ``small_m`` tile.
    The grid is an upper bound from host ints: every group may end in a partial tile. ``cfg.pair_small`` (w2)
    makes the short tiles span two column tiles."""
    if cfg.persistent and use_tma:
        persistent_moe.launch(gated, a, w_rows, out, offs, rows_per_expert, up_offset, n_tiles, e_local, block_m,
                              cfg, pdl)
        return
    small = small_m or block_m
    pair = cfg.pair_small and small < block_m and not gated
    joint = cfg.joint and gated
    grid = ((triton.cdiv(a.shape[0], block_m) + e_local) * n_tiles,)
    a_big = _operand(a, [block_m, cfg.block_k], use_tma)
    a_small = _operand(a, [small, cfg.block_k], use_tma) if small != block_m else a_big  # unused then
    w_tiles = _operand(w_rows, [cfg.block_n, cfg.block_k], use_tma)
    # w13 as [E * 2, F, D]: one [2, BN, BK] box holds a column tile's w1 and w3 rows (the same pointer untiled)
    w_joint = _operand(w_rows.view(-1, up_offset, w_rows.shape[1]), [2, cfg.block_n, cfg.block_k],
                       use_tma) if joint else w_tiles
    _sorted_kernel[grid](
        a_big, a_small, w_tiles, w_joint,
        out, offs, a.shape[0], rows_per_expert, up_offset, a.shape[1], a.stride(0), w_rows.stride(0),
        out.stride(0), E=e_local, N_TILES=n_tiles, BLOCK_M=block_m, SMALL_M=small, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GATED=gated, PAIR=pair, JOINT=joint, STAGES=cfg.num_stages,
        SMALL_STAGES=_pair_stages(cfg, small, a.element_size()) if pair else cfg.num_stages, USE_TMA=use_tma,
        WARP_SPECIALIZE=cfg.warp_specialize, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_args(a, pdl),
    )


def invoke_w13(xs: torch.Tensor, w13: torch.Tensor, act: torch.Tensor, offs: torch.Tensor, block_m: int,
               cfg: GemmConfig, use_tma: bool, small_m: int = 0, pdl: bool = True) -> None:
    """act [P, F] = silu(xs w1^T) * (xs w3^T) per row, each row against its group's expert (``offs`` ends)."""
    e_local, two_f, d = w13.shape
    f = two_f // 2
    _gemm(True, xs, w13.view(e_local * two_f, d), act, offs, two_f, f, f // cfg.block_n, e_local, block_m, small_m,
          cfg, use_tma, pdl)


def invoke_w2(act: torch.Tensor, w2: torch.Tensor, y: torch.Tensor, offs: torch.Tensor, block_m: int,
              cfg: GemmConfig, use_tma: bool, small_m: int = 0, pdl: bool = True) -> None:
    """y [P, D] = act w2^T per row, each row against its group's expert."""
    e_local, d, f = w2.shape
    _gemm(False, act, w2.view(e_local * d, f), y, offs, d, 0, d // cfg.block_n, e_local, block_m, small_m, cfg,
          use_tma, pdl)


def sorted_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
               topk_ids: torch.Tensor, expert_start: int = 0, config: MoEConfig | None = None,
               use_tma: bool | None = None, pdl: bool = True) -> torch.Tensor:
    """x [N, D]; w13 [E_local, 2F, D]; w2 [E_local, D, F]; topk_weights [N, k] fp32; topk_ids [N, k] global ids
    -> [N, D] in x's dtype: sum over each token's local experts of weight * w2(silu(w1 x) * w3 x).

    ``config`` overrides the tuned tiles (the tuner uses it); ``use_tma`` None means TMA where the device has
    it (sm90+, or the CPU interpreter); ``pdl`` False launches without programmatic dependent launch. Raises
    ValueError naming the problem when the shapes break the contract or do not fit the tiles
    (``layout_problem``).
    """
    check_contract(x, w13, w2, topk_weights, topk_ids)
    n, d = x.shape
    e_local, two_f, _ = w13.shape
    f = two_f // 2
    k = topk_ids.shape[1]
    if config is None:
        config = moe_configs.get_sorted_config(e_local, f, d, n, x.dtype, x.device)
    problem = layout_problem(x, w13, w2, config)
    if problem is not None:
        raise ValueError(f"sorted_moe: {problem}")
    if n == 0:
        return x.new_zeros(0, d)
    use_tma = _has_tma(x.device) if use_tma is None else use_tma
    order, row_of_pair, offs = sort_pairs(topk_ids, e_local, expert_start, pdl)  # [P], [P], [E]
    num_local = offs[-1:]  # [1] rows from here on are other ranks' pairs: never multiplied
    xs = x.index_select(0, order // k)  # [P, D] row r = token of sorted pair r
    act = torch.empty(xs.shape[0], f, dtype=x.dtype, device=x.device)  # [P, F]
    invoke_w13(xs, w13, act, offs, config.block_m, config.w13, use_tma, config.small_m, pdl)
    y = torch.empty(xs.shape[0], d, dtype=x.dtype, device=x.device)  # [P, D] rows in sorted order
    invoke_w2(act, w2, y, offs, config.block_m, config.w2, use_tma, config.small_m, pdl)
    return combine(y, row_of_pair, topk_weights, num_local, pdl)  # [N, D]

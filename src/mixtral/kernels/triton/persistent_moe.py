"""Persistent variants of the prefill MoE's two grouped GEMMs (``sorted_moe.py``): one program per SM walks
the tiles.

Why: the non-persistent kernels hold ~190 KB of shared memory a program (a 128-row A tile and two 128-row
weight tiles, 4 stages), so one program fits an SM, and every tile is a new program that sets up, fills its
pipeline and stores its result on its own. Here the grid is the SM count and program p takes tiles p,
p + grid, ... Measured inside 32-layer prefills on an H200 (scripts/gpu_prefill_tiles.py, docs/KERNELS.md):
6.4% less time at 1024 tokens, 4.0% at 4096, 1.2% at 8192, no difference at 2048; the H200 table picks it
where it won.
(Letting Triton flatten the two loops into one pipelined loop, ``tl.range(flatten=True)``, made w13 50-70%
slower with Triton 3.6.)

The tile order is the one of ``sorted_moe._tile_of`` (expert-major, column tile, then row tile), so the row
tiles sharing a weight tile still run side by side on neighbouring SMs and the weights come from HBM once.
The tile count depends on the routing, which lives on the device: it is summed inside the kernel from the
group ends, no host sync. The group table is loaded once into registers (one lane per expert); each tile
finds its expert with a few vector reductions over it.

A group's short last block (``small_m``) is not split off here: every tile is ``BLOCK_M`` rows. A branch to
a second tile shape inside the tile loop (tried: the sorted kernels' own tile code behind a PERSISTENT flag)
made the persistent kernels 10-14% slower than the non-persistent ones; the reduction loop here has a
constant trip count and every tile it visits is real, so its body is one straight pipelined loop.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from mixtral.kernels.triton.moe_configs import GemmConfig
from mixtral.kernels.triton.pdl import pdl_args, pdl_enter


@triton.jit
def _groups(offs_ptr, E: tl.constexpr, E_P2: tl.constexpr, BLOCK_M: tl.constexpr, N_TILES: tl.constexpr):
    """Per expert lane (E_P2 lanes, those past E empty): first row, end row, row tiles, first tile id; and the
    total tile count."""
    idx = tl.arange(0, E_P2)  # [E_P2]
    ends = tl.load(offs_ptr + idx, mask=idx < E, other=0)
    starts = tl.load(offs_ptr + idx - 1, mask=(idx > 0) & (idx < E), other=0)
    m_tiles = tl.where(idx < E, tl.cdiv(ends - starts, BLOCK_M), 0)  # [E_P2]
    sizes = m_tiles * N_TILES
    first = tl.cumsum(sizes, 0) - sizes  # [E_P2] tile id of each expert's first tile
    return idx, starts, ends, m_tiles, first, tl.sum(sizes, 0)


@triton.jit
def _locate(tile, idx, starts, ends, m_tiles, first, BLOCK_M: tl.constexpr):
    """tile id -> (expert, first row, group end row, column tile); order: expert, column tile, row tile.
    The expert is the last one with tiles whose first tile id is <= tile (empty experts own no tiles and
    share their first id with the next expert)."""
    expert = tl.max(tl.where((first <= tile) & (m_tiles > 0), idx, -1), 0)
    hit = idx == expert
    m_count = tl.sum(tl.where(hit, m_tiles, 0), 0)
    local = tile - tl.sum(tl.where(hit, first, 0), 0)
    row0 = tl.sum(tl.where(hit, starts, 0), 0) + (local % m_count) * BLOCK_M
    return expert, row0, tl.sum(tl.where(hit, ends, 0), 0), local // m_count


@triton.jit
def _persistent_kernel(
    a, w, w_joint, out_ptr, offs_ptr, W_ROWS, UP_OFFSET, stride_om, grid,
    E: tl.constexpr, E_P2: tl.constexpr, N_TILES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, K_TILES: tl.constexpr, GATED: tl.constexpr, JOINT: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr, PDL: tl.constexpr,
):
    """out[r, n] = a[r] . w[e, n] for each row r of expert e's group, or with GATED (w13)
    silu(a[r] . w1[e, n]) * (a[r] . w3[e, n]), the w3 row UP_OFFSET rows after the w1 row. ``a`` [P, K] and
    ``w`` [E * W_ROWS, K] are TMA descriptors with [BLOCK_M, BLOCK_K] / [BLOCK_N, BLOCK_K] blocks;
    ``offs_ptr`` [E] group ends. JOINT (w13): ``w_joint`` views w13 as [E * 2, F, D] in [2, BLOCK_N, BLOCK_K]
    boxes, so one load and one MMA a step cover w1's and w3's tiles (``sorted_moe._tile``)."""
    pdl_enter(PDL)
    idx, starts, ends, m_tiles, first, total = _groups(offs_ptr, E, E_P2, BLOCK_M, N_TILES)
    cols = tl.arange(0, BLOCK_N)  # [BN]
    for tile in tl.range(tl.program_id(0), total, grid, warp_specialize=WARP_SPECIALIZE):
        expert, row0, row_end, n_tile = _locate(tile, idx, starts, ends, m_tiles, first, BLOCK_M)
        n0 = n_tile * BLOCK_N
        w_row = expert * W_ROWS + n0  # first weight row of this column tile (w1's for GATED)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if JOINT:  # w1's and w3's tiles as one [2 BN, BK] operand: one MMA of twice the width a step
            acc_j = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
            for kt in range(K_TILES):
                w_j = w_joint.load([2 * expert, n0, kt * BLOCK_K]).reshape(2 * BLOCK_N, BLOCK_K)
                acc_j = tl.dot(a.load([row0, kt * BLOCK_K]), w_j.T, acc_j)
            gate, up = acc_j.reshape(BLOCK_M, 2, BLOCK_N).permute(0, 2, 1).split()
            acc = gate * tl.sigmoid(gate) * up
        elif GATED:
            acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for kt in range(K_TILES):
                x_t = a.load([row0, kt * BLOCK_K])  # [BM, BK]; rows past P read as zeros
                acc = tl.dot(x_t, w.load([w_row, kt * BLOCK_K]).T, acc)
                acc_u = tl.dot(x_t, w.load([w_row + UP_OFFSET, kt * BLOCK_K]).T, acc_u)
            acc = acc * tl.sigmoid(acc) * acc_u  # SiLU(gate) * up on the fp32 sums, rounded once below
        else:
            for kt in range(K_TILES):
                acc = tl.dot(a.load([row0, kt * BLOCK_K]), w.load([w_row, kt * BLOCK_K]).T, acc)
        rows = row0 + tl.arange(0, BLOCK_M)  # [BM]
        ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + (n0 + cols)[None, :]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows < row_end)[:, None])


@functools.lru_cache(maxsize=16)
def num_sms(device: torch.device) -> int:
    """Programs of a persistent launch: the SM count on CUDA, a handful under the CPU interpreter."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch(gated: bool, a: torch.Tensor, w_rows: torch.Tensor, out: torch.Tensor, offs: torch.Tensor,
           rows_per_expert: int, up_offset: int, n_tiles: int, e_local: int, block_m: int, cfg: GemmConfig,
           pdl: bool = True) -> None:
    """One persistent launch over ``a`` [P, K] in ``block_m`` tiles against ``w_rows`` [E * rows_per_expert, K]
    (w13 with ``gated``: w3's rows ``up_offset`` after w1's). The grid is the SM count, or the tile count's
    upper bound (every group may end in a partial tile) when that is smaller."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    grid = min(num_sms(a.device), (triton.cdiv(a.shape[0], block_m) + e_local) * n_tiles)
    joint = cfg.joint and gated
    w_tiles = TensorDescriptor.from_tensor(w_rows, [cfg.block_n, cfg.block_k])
    w_joint = TensorDescriptor.from_tensor(w_rows.view(-1, up_offset, w_rows.shape[1]),
                                           [2, cfg.block_n, cfg.block_k]) if joint else w_tiles
    _persistent_kernel[(grid,)](
        TensorDescriptor.from_tensor(a, [block_m, cfg.block_k]), w_tiles, w_joint,
        out, offs, rows_per_expert, up_offset, out.stride(0), grid,
        E=e_local, E_P2=triton.next_power_of_2(e_local), N_TILES=n_tiles, BLOCK_M=block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, K_TILES=a.shape[1] // cfg.block_k, GATED=gated, JOINT=joint,
        WARP_SPECIALIZE=cfg.warp_specialize, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_args(a, pdl),
    )

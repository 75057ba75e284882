"""Attention over the paged KV cache in Triton: the ragged causal prefill kernel and the public entry point,
which sends pure decode batches (max_query_len <= 1) to paged_decode.py's split-K kernels.

Semantics are exactly ``reference.paged_attention_reference``: q [Nq, H, hd] holds the new tokens of every
sequence (sequence i owns rows query_start_loc[i]:query_start_loc[i+1]); the caches
[num_blocks, block_size, KV, hd] already hold every token, the new ones included; the new tokens are the
last ones of their sequence, so query row r of sequence i sits at position context_lens[i] - n_i + r.

GQA without repeating K/V: a program owns one KV head and the QG = H / KV query heads that share it. Its
rows are (token, head-in-group) pairs flattened, row = token * QG + head, so one K/V tile load serves
every query head of the group and QG need not be a power of two.

Key j of a sequence lives at block_tables[i, j // block_size], slot j % block_size: each key tile gathers
its physical blocks from the table (block_size need not divide the tile).

Launch shapes depend only on host ints (the number of sequences, ``max_query_len``, ``max_context_len``)
and every length is read on the device, so the kernels are CUDA-graph capturable; ``max_context_len`` and
``max_query_len`` only have to bound the true lengths.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixtral.kernels.triton.attention_tile import attend_tile
from mixtral.kernels.triton.paged_decode import decode_partition_size, paged_decode
from mixtral.kernels.triton.pdl import pdl_args, pdl_enter

_LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, qsl_ptr, out_ptr,
    qk_scale, v_scale, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bts,
    QG: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, SLIDING: tl.constexpr, PDL: tl.constexpr,
):
    """Program (sequence s, row tile, KV head g): rows token*QG + head of s's new tokens, causal."""
    pdl_enter(PDL)
    s = tl.program_id(0)
    tile = tl.program_id(1)
    g = tl.program_id(2)
    q_start = tl.load(qsl_ptr + s)
    n_q = tl.load(qsl_ptr + s + 1) - q_start
    if tile * BLOCK_M >= n_q * QG:
        return
    ctx = tl.load(context_lens_ptr + s)
    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    t = r // QG  # token within the sequence's new tokens
    head = g * QG + r % QG
    row_ok = t < n_q
    qpos = ctx - n_q + t  # [BM] absolute positions
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_rows = (q_start + t).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BM, BD]

    t_last = (tl.minimum((tile + 1) * BLOCK_M, n_q * QG) - 1) // QG  # the tile's last valid token
    hi = ctx - n_q + t_last + 1  # keys past the tile's last row are never visible
    first_q = ctx - n_q + (tile * BLOCK_M) // QG  # position of the tile's first query
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_ptr = block_tables_ptr + s.to(tl.int64) * stride_bts
    if SLIDING:
        lo = tl.maximum(first_q - window + 1, 0) // BLOCK_N * BLOCK_N
    else:
        # Keys before the first query are visible to every row: whole tiles of them need no mask.
        lo = (first_q + 1) // BLOCK_N * BLOCK_N
        for start in range(0, lo, BLOCK_N):
            acc, m_i, l_i = attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, bt_ptr, g, start, hi, qpos,
                                         window, qk_scale, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                                         stride_vh, d, d_ok, BLOCK_N, PAGE, SLIDING, False)
    for start in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, bt_ptr, g, start, hi, qpos,
                                     window, qk_scale, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                                     stride_vh, d, d_ok, BLOCK_N, PAGE, SLIDING, True)
    o = acc * v_scale / tl.where(l_i > 0, l_i, 1.0)[:, None]  # v_scale: an FP8 cache's (1.0 otherwise)
    tl.store(out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
           context_lens: torch.Tensor, query_start_loc: torch.Tensor) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"paged_attention: q {tuple(q.shape)} must be [N, H, hd] and caches "
                         f"{tuple(k_cache.shape)}/{tuple(v_cache.shape)} [num_blocks, block_size, KV, hd]")
    if q.shape[-1] != k_cache.shape[-1] or q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"paged_attention: {q.shape[1]} query heads of size {q.shape[-1]} do not fit "
                         f"{k_cache.shape[2]} KV heads of size {k_cache.shape[-1]}")
    s = block_tables.shape[0]
    if context_lens.shape != (s,) or query_start_loc.shape != (s + 1,):
        raise ValueError(f"paged_attention: {s} block-table rows need context_lens [{s}] and query_start_loc "
                         f"[{s + 1}], got {tuple(context_lens.shape)} and {tuple(query_start_loc.shape)}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("paged_attention: q and the caches must be contiguous in head_dim")


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, query_start_loc: torch.Tensor, *, max_query_len: int,
                    max_context_len: int, sliding_window: int | None = None, k_scale: float = 1.0,
                    v_scale: float = 1.0, pdl: bool = True) -> torch.Tensor:
    """q [N, H, hd] -> [N, H, hd]; see the module docstring. ``max_query_len`` <= 1 takes the decode path.
    ``k_scale`` / ``v_scale``: the layer's scales when the caches hold FP8 codes (kernels/kv_fp8.py)."""
    _check(q, k_cache, v_cache, block_tables, context_lens, query_start_loc)
    out = torch.empty_like(q)
    num_seqs = block_tables.shape[0]
    if q.shape[0] == 0 or num_seqs == 0:
        return out
    n_heads, head_dim = q.shape[1], q.shape[2]
    num_kv = k_cache.shape[2]
    qg = n_heads // num_kv
    qk_scale = head_dim ** -0.5 * _LOG2E * k_scale  # an FP8 cache's K scale folds into the softmax scale
    sliding = sliding_window is not None
    window = int(sliding_window) if sliding else 0
    common = dict(
        stride_qt=q.stride(0), stride_qh=q.stride(1), stride_ot=out.stride(0), stride_oh=out.stride(1),
        stride_kb=k_cache.stride(0), stride_kt=k_cache.stride(1), stride_kh=k_cache.stride(2),
        stride_vb=v_cache.stride(0), stride_vt=v_cache.stride(1), stride_vh=v_cache.stride(2),
        stride_bts=block_tables.stride(0),
    )
    block_d = max(16, triton.next_power_of_2(head_dim))
    page = k_cache.shape[1]
    if max_query_len <= 1:
        paged_decode(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, out, qk_scale, window,
                common, qg, block_d, page, sliding, max_context_len, v_scale, pdl)
        return out
    block_m, block_n, num_warps, num_stages = prefill_launch_config(max_query_len * qg, block_d)
    grid = (num_seqs, triton.cdiv(max_query_len * qg, block_m), num_kv)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, context_lens, query_start_loc, out, qk_scale, v_scale, window, **common,
        QG=qg, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        PAGE=page, SLIDING=sliding, num_warps=num_warps, num_stages=num_stages, **pdl_args(q, pdl),
    )
    return out


def prefill_launch_config(rows: int, block_d: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the prefill kernel for ``rows`` = max new tokens x QG.

    Long prompts: the best of eight variants timed on an H100 at 2048 tokens, 32/8 heads, head_dim 128
    (151 us, 228 TFLOP/s; docs/KERNELS.md). ``block_d`` is for future tuning.
    """
    del block_d
    if rows >= 1024:
        return 64, 64, 4, 3
    return 64, 32, 4, 2


__all__ = ["decode_partition_size", "paged_attention", "prefill_launch_config"]

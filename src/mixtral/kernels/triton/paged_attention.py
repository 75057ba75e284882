"""Attention over the paged KV cache in Triton: ragged causal prefill and split-K (flash-decoding) decode.

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

import functools

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_DECODE_BLOCK_N = 64
_MIN_PARTITION = 256  # keys per decode split: smaller splits cost more in the reduction than they gain


@triton.jit
def _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, bt_ptr, g, start, hi, qpos, window, qk_scale,
                 stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, d, d_ok,
                 BLOCK_N: tl.constexpr, PAGE: tl.constexpr, SLIDING: tl.constexpr, MASKED: tl.constexpr):
    """One online-softmax step over keys start..start+BLOCK_N (those < hi) for rows at positions qpos.

    Without MASKED the caller guarantees every key of the tile is < hi and visible to every row (the part of
    the context before the tile's first query), so the causal mask and its bounds checks are skipped.
    """
    kpos = start + tl.arange(0, BLOCK_N)  # [BN]
    k_ok = kpos < hi
    if MASKED:
        blk = tl.load(bt_ptr + kpos // PAGE, mask=k_ok, other=0).to(tl.int64)  # [BN] physical blocks
    else:
        blk = tl.load(bt_ptr + kpos // PAGE).to(tl.int64)
    slot = kpos % PAGE
    k_ptrs = k_cache_ptr + blk[None, :] * stride_kb + slot[None, :] * stride_kt + g * stride_kh + d[:, None]
    kt = tl.load(k_ptrs, mask=k_ok[None, :] & d_ok[:, None], other=0.0)  # [BD, BN]
    scores = tl.dot(q, kt) * qk_scale  # [BM, BN], log2 units
    if MASKED:
        visible = (kpos[None, :] <= qpos[:, None]) & k_ok[None, :]
        if SLIDING:
            visible = visible & (kpos[None, :] > qpos[:, None] - window)
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))  # [BM]
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet stay at zero
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(scores - m_use[:, None])  # [BM, BN]
    l_i = l_i * alpha + tl.sum(p, 1)
    v_ptrs = v_cache_ptr + blk[:, None] * stride_vb + slot[:, None] * stride_vt + g * stride_vh + d[None, :]
    v = tl.load(v_ptrs, mask=k_ok[:, None] & d_ok[None, :], other=0.0)  # [BN, BD]
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, qsl_ptr, out_ptr,
    qk_scale, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bts,
    QG: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, SLIDING: tl.constexpr,
):
    """Program (sequence s, row tile, KV head g): rows token*QG + head of s's new tokens, causal."""
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
            acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, bt_ptr, g, start, hi, qpos,
                                         window, qk_scale, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                                         stride_vh, d, d_ok, BLOCK_N, PAGE, SLIDING, False)
    for start in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, bt_ptr, g, start, hi, qpos,
                                     window, qk_scale, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                                     stride_vh, d, d_ok, BLOCK_N, PAGE, SLIDING, True)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, qsl_ptr, out_ptr,
    part_out_ptr, part_lse_ptr,
    qk_scale, window, partition_size,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bts,
    stride_pos, stride_poh, stride_pop, stride_pls, stride_plh,
    QG: tl.constexpr, QG_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, SLIDING: tl.constexpr, SPLIT: tl.constexpr,
):
    """Program (sequence s, KV head g, partition p): one new token, the group's QG heads, keys of partition p.

    With SPLIT the partial output (normalised) and its log2-sum-exp go to part_out/part_lse for
    ``_decode_reduce_kernel``; without it partition 0 spans the whole context and writes the output.
    """
    s = tl.program_id(0)
    g = tl.program_id(1)
    part = tl.program_id(2)
    q_row = tl.load(qsl_ptr + s)
    if tl.load(qsl_ptr + s + 1) == q_row:
        return  # a sequence with no new token (padding)
    ctx = tl.load(context_lens_ptr + s)
    hr = tl.arange(0, QG_PAD)
    h_ok = hr < QG
    head = g * QG + hr  # [QG_PAD]
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + q_row.to(tl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=h_ok[:, None] & d_ok[None, :], other=0.0)  # [QG_PAD, BD]
    qpos = tl.zeros([QG_PAD], tl.int32) + (ctx - 1)
    lo = part * partition_size
    hi = tl.minimum(lo + partition_size, ctx)
    if SLIDING:
        lo = tl.maximum(lo, tl.maximum(ctx - window, 0) // BLOCK_N * BLOCK_N)
    m_i = tl.full([QG_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([QG_PAD], tl.float32)
    acc = tl.zeros([QG_PAD, BLOCK_D], tl.float32)
    bt_ptr = block_tables_ptr + s.to(tl.int64) * stride_bts
    for start in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, bt_ptr, g, start, hi, qpos,
                                     window, qk_scale, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                                     stride_vh, d, d_ok, BLOCK_N, PAGE, SLIDING, True)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    mask = h_ok[:, None] & d_ok[None, :]
    if SPLIT:
        po = part_out_ptr + s * stride_pos + head[:, None] * stride_poh + part * stride_pop + d[None, :]
        tl.store(po, o, mask=mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + s * stride_pls + head * stride_plh + part, lse, mask=h_ok)
    else:
        tl.store(out_ptr + q_row.to(tl.int64) * stride_ot + head[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr, part_lse_ptr, context_lens_ptr, qsl_ptr, out_ptr, partition_size,
    stride_pos, stride_poh, stride_pop, stride_pls, stride_plh, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, P_PAD: tl.constexpr,
):
    """Program (sequence s, head h): merge the partitions that cover s's context by their log-sum-exp."""
    s = tl.program_id(0)
    h = tl.program_id(1)
    q_row = tl.load(qsl_ptr + s)
    if tl.load(qsl_ptr + s + 1) == q_row:
        return
    ctx = tl.load(context_lens_ptr + s)
    n_parts = (ctx + partition_size - 1) // partition_size
    p = tl.arange(0, P_PAD)
    p_ok = p < n_parts
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    lse = tl.load(part_lse_ptr + s * stride_pls + h * stride_plh + p, mask=p_ok, other=float("-inf"))  # [P]
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)  # [P]
    po = tl.load(part_out_ptr + s * stride_pos + h * stride_poh + p[:, None] * stride_pop + d[None, :],
                 mask=p_ok[:, None] & d_ok[None, :], other=0.0)  # [P, BD]
    total = tl.sum(w, 0)
    o = tl.sum(po * w[:, None], 0) / tl.where(total > 0, total, 1.0)  # [BD]
    tl.store(out_ptr + q_row.to(tl.int64) * stride_ot + h * stride_oh + d, o.to(out_ptr.dtype.element_ty),
             mask=d_ok)


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # interpreter: pretend to be an H100 so the split logic is exercised on CPU too
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_partition_size(num_seqs: int, num_kv_heads: int, max_context_len: int, num_sms: int) -> int | None:
    """Keys per split for the decode kernel, or None for no split. Host ints only (graph-safe).

    Split when (sequences x KV heads) programs cannot fill about two waves of the GPU, into partitions of at
    least ``_MIN_PARTITION`` keys. Example: batch 1, 8 KV heads, 4096-token context, 132 SMs -> 16 splits
    of 256 keys.
    """
    programs = num_seqs * num_kv_heads
    target = 2 * num_sms
    if programs >= target or max_context_len <= _MIN_PARTITION:
        return None
    parts = min(triton.cdiv(target, programs), triton.cdiv(max_context_len, _MIN_PARTITION))
    if parts <= 1:
        return None
    return triton.cdiv(triton.cdiv(max_context_len, parts), _DECODE_BLOCK_N) * _DECODE_BLOCK_N


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
                    max_context_len: int, sliding_window: int | None = None) -> torch.Tensor:
    """q [N, H, hd] -> [N, H, hd]; see the module docstring. ``max_query_len`` <= 1 takes the decode path."""
    _check(q, k_cache, v_cache, block_tables, context_lens, query_start_loc)
    out = torch.empty_like(q)
    num_seqs = block_tables.shape[0]
    if q.shape[0] == 0 or num_seqs == 0:
        return out
    n_heads, head_dim = q.shape[1], q.shape[2]
    num_kv = k_cache.shape[2]
    qg = n_heads // num_kv
    qk_scale = head_dim ** -0.5 * _LOG2E
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
        _decode(q, k_cache, v_cache, block_tables, context_lens, query_start_loc, out, qk_scale, window,
                common, qg, block_d, page, sliding, max_context_len)
        return out
    block_m, block_n, num_warps, num_stages = prefill_launch_config(max_query_len * qg, block_d)
    grid = (num_seqs, triton.cdiv(max_query_len * qg, block_m), num_kv)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, context_lens, query_start_loc, out, qk_scale, window, **common,
        QG=qg, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        PAGE=page, SLIDING=sliding, num_warps=num_warps, num_stages=num_stages,
    )
    return out


def prefill_launch_config(rows: int, block_d: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the prefill kernel for ``rows`` = max new tokens x QG.

    Long prompts: the best of eight variants timed on an H100 at 2048 tokens, 32/8 heads, head_dim 128
    (151 us, 228 TFLOP/s; scripts/gpu_kernel_check.py's prefill sweep). ``block_d`` is for future tuning.
    """
    del block_d
    if rows >= 1024:
        return 64, 64, 4, 3
    return 64, 32, 4, 2


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
            context_lens: torch.Tensor, query_start_loc: torch.Tensor, out: torch.Tensor, qk_scale: float,
            window: int, common: dict[str, int], qg: int, block_d: int, page: int, sliding: bool,
            max_context_len: int) -> None:
    num_seqs, n_heads, num_kv = block_tables.shape[0], q.shape[1], k_cache.shape[2]
    part_size = decode_partition_size(num_seqs, num_kv, max_context_len, _num_sms(q.device))
    meta = dict(QG=qg, QG_PAD=max(16, triton.next_power_of_2(qg)), HEAD_DIM=q.shape[2], BLOCK_D=block_d,
                BLOCK_N=_DECODE_BLOCK_N, PAGE=page, SLIDING=sliding, num_warps=4, num_stages=2)
    if part_size is None:
        dummy = out.new_empty(1, dtype=torch.float32)
        _decode_kernel[(num_seqs, num_kv, 1)](
            q, k_cache, v_cache, block_tables, context_lens, query_start_loc, out, dummy, dummy,
            qk_scale, window, 1 << 30, **common,
            stride_pos=0, stride_poh=0, stride_pop=0, stride_pls=0, stride_plh=0, SPLIT=False, **meta,
        )
        return
    num_parts = triton.cdiv(max_context_len, part_size)
    part_out = torch.empty(num_seqs, n_heads, num_parts, q.shape[2], dtype=torch.float32, device=q.device)
    part_lse = torch.empty(num_seqs, n_heads, num_parts, dtype=torch.float32, device=q.device)
    split_strides = dict(stride_pos=part_out.stride(0), stride_poh=part_out.stride(1),
                         stride_pop=part_out.stride(2), stride_pls=part_lse.stride(0), stride_plh=part_lse.stride(1))
    _decode_kernel[(num_seqs, num_kv, num_parts)](
        q, k_cache, v_cache, block_tables, context_lens, query_start_loc, out, part_out, part_lse,
        qk_scale, window, part_size, **common, **split_strides, SPLIT=True, **meta,
    )
    _decode_reduce_kernel[(num_seqs, n_heads)](
        part_out, part_lse, context_lens, query_start_loc, out, part_size, **split_strides,
        stride_ot=out.stride(0), stride_oh=out.stride(1), HEAD_DIM=q.shape[2], BLOCK_D=block_d,
        P_PAD=max(2, triton.next_power_of_2(num_parts)), num_warps=4,
    )


__all__ = ["decode_partition_size", "paged_attention", "prefill_launch_config"]

"""Paged attention for decode (one new token per sequence) in Triton, split-K when the batch is small.

Flash-decoding: with few (sequence, KV head) programs the GPU would idle, so each sequence's context is cut
into partitions of ``decode_partition_size`` keys, one program per (sequence, KV head, partition) writes a
normalised partial output and its log-sum-exp, and a second kernel merges the partitions. With enough
programs a single pass writes the output directly. The split is chosen from host ints only, so a CUDA graph
captured for a batch size stays valid for every context up to its ``max_context_len``.

That bound is the captured one (max_model_len), usually far above the running contexts, so the partition
size is capped: at batch 1-4 a 512-token context is 4 partitions of 128 keys working in parallel rather than
one program walking a quarter of 32K. Partitions past a sequence's context exit at once, and the merge walks
the partitions in chunks, so thousands of them cost little.

Called through ``paged_attention.paged_attention`` (max_query_len <= 1); see that module for the layout.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from mixtral.kernels.triton.attention_tile import attend_tile
from mixtral.kernels.triton.pdl import pdl_args, pdl_enter

DECODE_BLOCK_N = 64
MIN_PARTITION = 64  # keys per decode split: one tile
# Largest split at small batch (<= 4 sequences), where latency, not the merge's traffic, is what counts;
# larger batches allow longer splits, which write fewer partial outputs.
MAX_PARTITION_SMALL_BATCH = 128
MAX_PARTITION = 512
REDUCE_BLOCK_P = 32  # partitions merged per step of the reduction


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, qsl_ptr, out_ptr,
    part_out_ptr, part_lse_ptr,
    qk_scale, v_scale, window, partition_size,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bts,
    stride_pos, stride_poh, stride_pop, stride_pls, stride_plh,
    QG: tl.constexpr, QG_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, SLIDING: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
):
    """Program (sequence s, KV head g, partition p): one new token, the group's QG heads, keys of partition p.

    With SPLIT the partial output (normalised) and its log2-sum-exp go to part_out/part_lse for
    ``_decode_reduce_kernel``; without it partition 0 spans the whole context and writes the output.
    """
    pdl_enter(PDL)
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
    if lo >= ctx:
        return  # past this sequence's context: the merge never reads this partition
    hi = tl.minimum(lo + partition_size, ctx)
    if SLIDING:
        lo = tl.maximum(lo, tl.maximum(ctx - window, 0) // BLOCK_N * BLOCK_N)
    m_i = tl.full([QG_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([QG_PAD], tl.float32)
    acc = tl.zeros([QG_PAD, BLOCK_D], tl.float32)
    bt_ptr = block_tables_ptr + s.to(tl.int64) * stride_bts
    for start in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, bt_ptr, g, start, hi, qpos,
                                     window, qk_scale, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                                     stride_vh, d, d_ok, BLOCK_N, PAGE, SLIDING, True)
    o = acc * v_scale / tl.where(l_i > 0, l_i, 1.0)[:, None]  # v_scale: an FP8 cache's (1.0 otherwise)
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
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, P_BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    """Program (sequence s, head h): merge the partitions that cover s's context by their log-sum-exp."""
    pdl_enter(PDL)
    s = tl.program_id(0)
    h = tl.program_id(1)
    q_row = tl.load(qsl_ptr + s)
    if tl.load(qsl_ptr + s + 1) == q_row:
        return
    ctx = tl.load(context_lens_ptr + s)
    n_parts = (ctx + partition_size - 1) // partition_size
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    # Online merge over chunks of P_BLOCK partitions: a running max m, the weight total and the weighted sum.
    m = float("-inf")
    total = 0.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    for p0 in range(0, n_parts, P_BLOCK):
        p = p0 + tl.arange(0, P_BLOCK)
        p_ok = p < n_parts
        lse = tl.load(part_lse_ptr + s * stride_pls + h * stride_plh + p, mask=p_ok, other=float("-inf"))  # [P]
        m_new = tl.maximum(m, tl.max(lse, 0))  # finite from the first chunk on (partition 0 has keys)
        scale = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)  # [P]
        po = tl.load(part_out_ptr + s * stride_pos + h * stride_poh + p[:, None] * stride_pop + d[None, :],
                     mask=p_ok[:, None] & d_ok[None, :], other=0.0)  # [P, BD]
        acc = acc * scale + tl.sum(po * w[:, None], 0)
        total = total * scale + tl.sum(w, 0)
        m = m_new
    o = acc / tl.where(total > 0, total, 1.0)  # [BD]
    tl.store(out_ptr + q_row.to(tl.int64) * stride_ot + h * stride_oh + d, o.to(out_ptr.dtype.element_ty),
             mask=d_ok)


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # interpreter: pretend to be an H100 so the split logic is exercised on CPU too
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_partition_size(num_seqs: int, num_kv_heads: int, max_context_len: int, num_sms: int) -> int | None:
    """Keys per split for the decode kernel, or None for no split. Host ints only (graph-safe).

    Split when (sequences x KV heads) programs cannot fill about two waves of the GPU: into enough partitions
    for two waves over ``max_context_len``, each a multiple of the 64-key tile, at most
    ``MAX_PARTITION_SMALL_BATCH`` keys at batch <= 4 (``MAX_PARTITION`` above). Examples (132 SMs, 8 KV heads):
    batch 1 over 2048 keys -> 64; batch 1 over 32K -> 128; batch 16 over 4096 -> 256.
    """
    programs = num_seqs * num_kv_heads
    target = 2 * num_sms
    if programs >= target or max_context_len <= MIN_PARTITION:
        return None
    parts = triton.cdiv(target, programs)
    size = triton.cdiv(triton.cdiv(max_context_len, parts), DECODE_BLOCK_N) * DECODE_BLOCK_N
    cap = MAX_PARTITION_SMALL_BATCH if num_seqs <= 4 else MAX_PARTITION
    return max(MIN_PARTITION, min(size, cap))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, query_start_loc: torch.Tensor, out: torch.Tensor, qk_scale: float,
                 window: int, common: dict[str, int], qg: int, block_d: int, page: int, sliding: bool,
                 max_context_len: int, v_scale: float = 1.0, pdl: bool = True) -> None:
    """Write out [N, H, hd] for one new token per sequence (``paged_attention`` checked the arguments and
    gathered the strides in ``common``; an FP8 cache's ``k_scale`` is already in ``qk_scale``)."""
    num_seqs, n_heads, num_kv = block_tables.shape[0], q.shape[1], k_cache.shape[2]
    part_size = decode_partition_size(num_seqs, num_kv, max_context_len, _num_sms(q.device))
    meta = dict(QG=qg, QG_PAD=max(16, triton.next_power_of_2(qg)), HEAD_DIM=q.shape[2], BLOCK_D=block_d,
                BLOCK_N=DECODE_BLOCK_N, PAGE=page, SLIDING=sliding, num_warps=4, num_stages=2)
    if part_size is None:
        dummy = out.new_empty(1, dtype=torch.float32)
        _decode_kernel[(num_seqs, num_kv, 1)](
            q, k_cache, v_cache, block_tables, context_lens, query_start_loc, out, dummy, dummy,
            qk_scale, v_scale, window, 1 << 30, **common,
            stride_pos=0, stride_poh=0, stride_pop=0, stride_pls=0, stride_plh=0, SPLIT=False, **meta,
            **pdl_args(q, pdl),
        )
        return
    num_parts = triton.cdiv(max_context_len, part_size)
    part_out = torch.empty(num_seqs, n_heads, num_parts, q.shape[2], dtype=torch.float32, device=q.device)
    part_lse = torch.empty(num_seqs, n_heads, num_parts, dtype=torch.float32, device=q.device)
    split_strides = dict(stride_pos=part_out.stride(0), stride_poh=part_out.stride(1),
                         stride_pop=part_out.stride(2), stride_pls=part_lse.stride(0), stride_plh=part_lse.stride(1))
    _decode_kernel[(num_seqs, num_kv, num_parts)](
        q, k_cache, v_cache, block_tables, context_lens, query_start_loc, out, part_out, part_lse,
        qk_scale, v_scale, window, part_size, **common, **split_strides, SPLIT=True, **meta, **pdl_args(q, pdl),
    )
    _decode_reduce_kernel[(num_seqs, n_heads)](
        part_out, part_lse, context_lens, query_start_loc, out, part_size, **split_strides,
        stride_ot=out.stride(0), stride_oh=out.stride(1), HEAD_DIM=q.shape[2], BLOCK_D=block_d,
        P_BLOCK=min(REDUCE_BLOCK_P, max(2, triton.next_power_of_2(num_parts))), num_warps=4, **pdl_args(part_out, pdl),
    )

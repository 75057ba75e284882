"""The online-softmax step shared by the paged prefill and decode kernels (Triton).

One call attends a tile of rows to BLOCK_N consecutive keys of one sequence, gathering each key's physical
block from the sequence's block table: key j lives at block_tables[j // PAGE], slot j % PAGE. Scores are in
log2 units (the caller folds log2(e) into qk_scale) so the kernel uses exp2.

An FP8 cache (kernels/kv_fp8.py) is read as codes widened to q's dtype (exact; a no-op for other caches):
the caller folds ``k_scale`` into qk_scale and multiplies the output by ``v_scale``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, bt_ptr, g, start, hi, qpos, window, qk_scale,
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
    kt = tl.load(k_ptrs, mask=k_ok[None, :] & d_ok[:, None], other=0.0).to(q.dtype)  # [BD, BN]
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
    v = tl.load(v_ptrs, mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(q.dtype)  # [BN, BD]
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i

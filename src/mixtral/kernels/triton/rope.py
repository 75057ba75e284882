"""Rotary embedding of q and k in one kernel (Triton), "rotate_half" layout: pairs (i, i + hd/2).

Matches ``reference.rope_reference`` bit for bit: PyTorch computes ``x * cos + rotate_half(x) * sin`` as three
elementwise ops in x's dtype (each product and the sum rounded to it; cos and sin are already in that dtype,
see model/layers.py ``rope_cos_sin``). The kernel rounds at the same three places, and launches with
``enable_fp_fusion=False`` so the fp32 case is not contracted into an FMA (one rounding fewer than PyTorch).

One program per token rotates all of its query heads and key heads. q and k may be strided views of the fused
qkv projection (unit stride along head_dim only); the results are new contiguous tensors. Given the paged
caches, the same program also stores the rotated k and v at the token's slot (the engine's decode step:
one launch instead of RoPE then ``write_kv``, ~1.5 us a layer at batch 1 on an H200).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixtral.kernels.triton.fp8_kv import to_cache
from mixtral.kernels.triton.pdl import pdl_args, pdl_enter


@triton.jit
def _rotate_heads(src, stride_h, n_heads, half, c_lo, c_hi, s_lo, s_hi, dt: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_HALF: tl.constexpr):
    """Rotate one token's [n_heads, 2 * half] rows at ``src`` (heads ``stride_h`` apart); c_*/s_* are
    [1, BLOCK_HALF] fp32 (dtype-exact). Returns (low halves, high halves) [BH, BHALF] in ``dt`` and their mask."""
    h = tl.arange(0, BLOCK_H)[:, None]  # [BH, 1]
    d = tl.arange(0, BLOCK_HALF)[None, :]  # [1, BHALF]
    mask = (h < n_heads) & (d < half)
    lo = tl.load(src + h * stride_h + d, mask=mask, other=0.0).to(tl.float32)  # [BH, BHALF] x[..., :half]
    hi = tl.load(src + h * stride_h + half + d, mask=mask, other=0.0).to(tl.float32)  # x[..., half:]
    # out[:half] = x_lo * cos_lo + (-x_hi) * sin_lo; out[half:] = x_hi * cos_hi + x_lo * sin_hi; each product
    # and each sum rounded to dt, as three separate PyTorch kernels would.
    out_lo = (lo * c_lo).to(dt).to(tl.float32) + (-hi * s_lo).to(dt).to(tl.float32)
    out_hi = (hi * c_hi).to(dt).to(tl.float32) + (lo * s_hi).to(dt).to(tl.float32)
    return out_lo.to(dt), out_hi.to(dt), mask


@triton.jit
def _store_halves(dst, stride_h, lo, hi, mask, half, scale, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Store both halves in dst's dtype (an FP8 cache: codes of x / scale, see fp8_kv.to_cache)."""
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    tl.store(dst + h * stride_h + d, to_cache(lo, scale, dst.dtype.element_ty), mask=mask)
    tl.store(dst + h * stride_h + half + d, to_cache(hi, scale, dst.dtype.element_ty), mask=mask)


@triton.jit
def _rope_qk_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr,
    v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_cn, stride_sn,
    stride_qon, stride_qoh, stride_kon, stride_koh,
    stride_vn, stride_vh, stride_cb, stride_ct, stride_ch,
    n_q_heads, n_k_heads, half, block_size, k_scale, v_scale,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, CACHE: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program per token: rotate its q and k heads; with CACHE also store the rotated k and v at the token's
    slot of the paged caches [blocks, block_size, KV, hd] (slot -1: padding, stored nowhere)."""
    pdl_enter(PDL)
    tok = tl.program_id(0).to(tl.int64)
    dt = qo_ptr.dtype.element_ty
    d = tl.arange(0, BLOCK_HALF)[None, :]  # [1, BHALF]
    dm = d < half
    c_lo = tl.load(cos_ptr + tok * stride_cn + d, mask=dm, other=0.0).to(tl.float32)
    c_hi = tl.load(cos_ptr + tok * stride_cn + half + d, mask=dm, other=0.0).to(tl.float32)
    s_lo = tl.load(sin_ptr + tok * stride_sn + d, mask=dm, other=0.0).to(tl.float32)
    s_hi = tl.load(sin_ptr + tok * stride_sn + half + d, mask=dm, other=0.0).to(tl.float32)
    q_lo, q_hi, q_mask = _rotate_heads(q_ptr + tok * stride_qn, stride_qh, n_q_heads, half, c_lo, c_hi, s_lo, s_hi,
                                       dt, BLOCK_HQ, BLOCK_HALF)
    _store_halves(qo_ptr + tok * stride_qon, stride_qoh, q_lo, q_hi, q_mask, half, 1.0, BLOCK_HQ, BLOCK_HALF)
    k_lo, k_hi, k_mask = _rotate_heads(k_ptr + tok * stride_kn, stride_kh, n_k_heads, half, c_lo, c_hi, s_lo, s_hi,
                                       dt, BLOCK_HK, BLOCK_HALF)
    _store_halves(ko_ptr + tok * stride_kon, stride_koh, k_lo, k_hi, k_mask, half, 1.0, BLOCK_HK, BLOCK_HALF)
    if CACHE:
        slot = tl.load(slot_ptr + tok).to(tl.int64)
        if slot >= 0:
            row = (slot // block_size) * stride_cb + (slot % block_size) * stride_ct  # the slot's [KV, hd] row
            _store_halves(k_cache_ptr + row, stride_ch, k_lo, k_hi, k_mask, half, k_scale, BLOCK_HK, BLOCK_HALF)
            h = tl.arange(0, BLOCK_HK)[:, None]
            v_src = v_ptr + tok * stride_vn + h * stride_vh
            v_lo = tl.load(v_src + d, mask=k_mask)
            v_hi = tl.load(v_src + half + d, mask=k_mask)
            _store_halves(v_cache_ptr + row, stride_ch, v_lo, v_hi, k_mask, half, v_scale, BLOCK_HK, BLOCK_HALF)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
            kv_scales: tuple[float, float] = (1.0, 1.0), pdl: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, H, hd], k [N, KV, hd], cos/sin [N, hd] (all one dtype) -> rotated (q, k), new contiguous tensors.

    ``cache`` = (v [N, KV, hd], k_cache, v_cache [blocks, block_size, KV, hd], slot_mapping [N]) also stores the
    rotated k and v at each token's slot (-1 skips), the work of ``write_kv``, in the same launch; an FP8 cache
    stores codes of k / kv_scales[0] and v / kv_scales[1]."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"rope_qk: q {tuple(q.shape)} and k {tuple(k.shape)} must be [N, heads, hd] "
                         "with the same N and hd")
    n, _, hd = q.shape
    if hd % 2:
        raise ValueError(f"rope_qk: head_dim {hd} must be even")
    if cos.shape != (n, hd) or sin.shape != (n, hd):
        raise ValueError(f"rope_qk: cos {tuple(cos.shape)} / sin {tuple(sin.shape)} must be [N, hd] = [{n}, {hd}]")
    dtypes = {q.dtype, k.dtype, cos.dtype, sin.dtype}
    if len(dtypes) != 1:
        raise ValueError(f"rope_qk: q, k, cos, sin must share one dtype, got {sorted(map(str, dtypes))}")
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if cache is not None:
        v, k_cache, v_cache, slots = cache
        if (v.shape != k.shape or slots.shape != (n,) or k_cache.shape[2:] != k.shape[1:]
                or v_cache.shape != k_cache.shape):
            raise ValueError(f"rope_qk: v {tuple(v.shape)}, caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)} "
                             f"and slot_mapping {tuple(slots.shape)} do not fit k {tuple(k.shape)}")
        if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
            raise ValueError("rope_qk: the caches must share strides and be contiguous in head_dim")
        v = v if v.stride(-1) == 1 else v.contiguous()
    else:
        v, k_cache, v_cache, slots = k, k_out, k_out, k_out  # unused without CACHE
    if n == 0:
        return q_out, k_out
    half = hd // 2
    block_hq, block_hk = triton.next_power_of_2(q.shape[1]), triton.next_power_of_2(k.shape[1])
    block_half = triton.next_power_of_2(half)
    cached = cache is not None
    _rope_qk_kernel[(n,)](
        q, k, cos, sin, q_out, k_out, v, k_cache, v_cache, slots,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        v.stride(0), v.stride(1), k_cache.stride(0) if cached else 0, k_cache.stride(1) if cached else 0,
        k_cache.stride(2) if cached else 0,
        q.shape[1], k.shape[1], half, k_cache.shape[1] if cached else 1, *kv_scales,
        BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half, CACHE=cached,
        num_warps=4 if block_hq * block_half >= 1024 else 1,
        enable_fp_fusion=False, **pdl_args(q, pdl),
    )
    return q_out, k_out

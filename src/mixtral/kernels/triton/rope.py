"""Rotary embedding of q and k in one kernel (Triton), "rotate_half" layout: pairs (i, i + hd/2).

Matches ``reference.rope_reference`` bit for bit: PyTorch computes ``x * cos + rotate_half(x) * sin`` as three
elementwise ops in x's dtype (each product and the sum rounded to it; cos and sin are already in that dtype,
see model/layers.py ``rope_cos_sin``). The kernel rounds at the same three places, and launches with
``enable_fp_fusion=False`` so the fp32 case is not contracted into an FMA (one rounding fewer than PyTorch).

One program per token rotates all of its query heads and key heads. q and k may be strided views of the fused
qkv projection (unit stride along head_dim only); the results are new contiguous tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixtral.kernels.triton.pdl import pdl_args, pdl_enter


@triton.jit
def _rotate_heads(x_ptr, o_ptr, stride_xn, stride_xh, stride_on, stride_oh, tok, n_heads, half,
                  c_lo, c_hi, s_lo, s_hi, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate the [n_heads, 2 * half] rows of one token; c_*/s_* are [1, BLOCK_HALF] fp32 (dtype-exact)."""
    dt = o_ptr.dtype.element_ty
    h = tl.arange(0, BLOCK_H)[:, None]  # [BH, 1]
    d = tl.arange(0, BLOCK_HALF)[None, :]  # [1, BHALF]
    mask = (h < n_heads) & (d < half)
    src = x_ptr + tok * stride_xn + h * stride_xh + d
    lo = tl.load(src, mask=mask, other=0.0).to(tl.float32)  # [BH, BHALF] x[..., :half]
    hi = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)  # x[..., half:]
    # out[:half] = x_lo * cos_lo + (-x_hi) * sin_lo; out[half:] = x_hi * cos_hi + x_lo * sin_hi; each product
    # and each sum rounded to dt, as three separate PyTorch kernels would.
    out_lo = (lo * c_lo).to(dt).to(tl.float32) + (-hi * s_lo).to(dt).to(tl.float32)
    out_hi = (hi * c_hi).to(dt).to(tl.float32) + (lo * s_hi).to(dt).to(tl.float32)
    dst = o_ptr + tok * stride_on + h * stride_oh + d
    tl.store(dst, out_lo.to(dt), mask=mask)
    tl.store(dst + half, out_hi.to(dt), mask=mask)


@triton.jit
def _rope_qk_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_cn, stride_sn,
    stride_qon, stride_qoh, stride_kon, stride_koh,
    n_q_heads, n_k_heads, half,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    tok = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)[None, :]  # [1, BHALF]
    dm = d < half
    c_lo = tl.load(cos_ptr + tok * stride_cn + d, mask=dm, other=0.0).to(tl.float32)
    c_hi = tl.load(cos_ptr + tok * stride_cn + half + d, mask=dm, other=0.0).to(tl.float32)
    s_lo = tl.load(sin_ptr + tok * stride_sn + d, mask=dm, other=0.0).to(tl.float32)
    s_hi = tl.load(sin_ptr + tok * stride_sn + half + d, mask=dm, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, qo_ptr, stride_qn, stride_qh, stride_qon, stride_qoh, tok, n_q_heads, half,
                  c_lo, c_hi, s_lo, s_hi, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr, ko_ptr, stride_kn, stride_kh, stride_kon, stride_koh, tok, n_k_heads, half,
                  c_lo, c_hi, s_lo, s_hi, BLOCK_HK, BLOCK_HALF)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, H, hd], k [N, KV, hd], cos/sin [N, hd] (all one dtype) -> rotated (q, k), new contiguous tensors."""
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
    if n == 0:
        return q_out, k_out
    half = hd // 2
    block_hq, block_hk = triton.next_power_of_2(q.shape[1]), triton.next_power_of_2(k.shape[1])
    block_half = triton.next_power_of_2(half)
    _rope_qk_kernel[(n,)](
        q, k, cos, sin, q_out, k_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        q.shape[1], k.shape[1], half,
        BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half,
        num_warps=4 if block_hq * block_half >= 1024 else 1,
        enable_fp_fusion=False, **pdl_args(q),
    )
    return q_out, k_out

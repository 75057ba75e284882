"""Store the new tokens' K/V rows into the paged cache at their slots (Triton).

slot = physical_block * block_size + offset; a slot of -1 (padding) is skipped. Same semantics as
``reference.write_kv_reference``. One program per token writes its KV*hd values of K and of V. An FP8 cache
stores codes of k / k_scale and v / v_scale (kernels/kv_fp8.py's ``write_kv_fp8_reference``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixtral.kernels.triton.fp8_kv import to_cache
from mixtral.kernels.triton.pdl import pdl_args, pdl_enter


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kn, stride_kh, stride_vn, stride_vh,
    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
    block_size, num_kv, head_dim, k_scale, v_scale,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    tok = tl.program_id(0)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot < 0:
        return
    blk = slot // block_size
    off = slot % block_size
    h = tl.arange(0, BLOCK_H)[:, None]  # [BH, 1]
    d = tl.arange(0, BLOCK_D)[None, :]  # [1, BD]
    mask = (h < num_kv) & (d < head_dim)
    k = tl.load(k_ptr + tok * stride_kn + h * stride_kh + d, mask=mask)  # [BH, BD]
    v = tl.load(v_ptr + tok * stride_vn + h * stride_vh + d, mask=mask)
    kc = k_cache_ptr + blk * stride_kcb + off * stride_kct + h * stride_kch + d
    vc = v_cache_ptr + blk * stride_vcb + off * stride_vct + h * stride_vch + d
    tl.store(kc, to_cache(k, k_scale, k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(vc, to_cache(v, v_scale, v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0, pdl: bool = True) -> None:
    """k/v [N, KV, hd] -> k_cache/v_cache [num_blocks, block_size, KV, hd] at slot_mapping [N] (-1 skips);
    ``k_scale`` / ``v_scale`` divide what an FP8 cache stores (unused by other caches)."""
    if k.shape != v.shape or k.dim() != 3 or k.shape[0] != slot_mapping.shape[0]:
        raise ValueError(f"write_kv: k {tuple(k.shape)}, v {tuple(v.shape)} must be [N, KV, hd] with "
                         f"N = len(slot_mapping) = {slot_mapping.shape[0]}")
    if k_cache.shape[2:] != k.shape[1:] or v_cache.shape != k_cache.shape:
        raise ValueError(f"write_kv: caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not hold rows "
                         f"of shape {tuple(k.shape[1:])}")
    n, num_kv, head_dim = k.shape
    if n == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("write_kv: caches must be contiguous in head_dim")
    _write_kv_kernel[(n,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_cache.shape[1], num_kv, head_dim, k_scale, v_scale,
        BLOCK_H=triton.next_power_of_2(num_kv), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4, **pdl_args(k, pdl),
    )

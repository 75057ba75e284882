"""Storing K/V rows into an FP8 (e4m3) paged cache, shared by write_kv.py and rope.py's fused store.

A cache of float8_e4m3fn holds round(x / scale) per element with one fp32 scale per layer for K and one for
V (vLLM's ``--kv-cache-dtype fp8`` layout: ``k_scale`` / ``v_scale``); the attention kernels read the codes,
widen them to the query's dtype (exact) and fold the scales in: ``k_scale`` into the softmax scale,
``v_scale`` into the output. See kernels/kv_fp8.py for the PyTorch reference and where scales come from.
"""

from __future__ import annotations

import triton
import triton.language as tl

from mixtral.kernels.triton.fp8_quant import to_e4m3


@triton.jit
def to_cache(x, scale, dtype: tl.constexpr):
    """x as stored in a cache of ``dtype``: e4m3 codes of x / scale for an FP8 cache, else x cast (the scale
    is not used: a bf16/fp16/fp32 cache stores values as they are)."""
    if dtype == tl.float8e4nv:
        return to_e4m3(x.to(tl.float32), scale)
    else:
        return x.to(dtype)

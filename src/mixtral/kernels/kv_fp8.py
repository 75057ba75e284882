"""FP8 KV cache: the PyTorch reference of storing and attending over float8_e4m3fn K/V with per-layer scales.

Layout (vLLM's ``--kv-cache-dtype fp8``): the paged caches [num_blocks, block_size, KV, hd] hold e4m3 codes,
code = round(x / scale) saturated to +-448, with one fp32 ``k_scale`` and one ``v_scale`` per layer; the value
a code stands for is code * scale. The Triton kernels (write_kv.py, rope.py's fused store, paged_attention.py,
paged_decode.py) are held to these functions.

Where the scales come from (decided here, as vLLM does): a checkpoint that carries them (compressed-tensors
``kv_cache_scheme``: ``self_attn.k_scale`` / ``v_scale``; AutoFP8 ``kv_cache_scheme: "static"``:
``k_proj.output_scale`` / ``v_proj.output_scale``; see checkpoint/fp8_formats.kv_scale_names), else 1.0.
Why 1.0 and no calibration flag: an e4m3 code's relative precision (3 mantissa bits, rounding error <= 2^-4)
does not depend on the scale for magnitudes between 2^-6 and 448 (times the scale); a scale only matters
when values fall below 2^-6 (fewer significant bits) or above 448 (saturated). Measured
(``python -m mixtral.bench.kv_quality``, docs/QUANTIZATION.md): the demo model's K/V peak at 3-15 with 0.5-8%
of the elements under 2^-6, and their rounding error is 2.6-2.7% at 1.0 and at the amax-derived scale alike;
on Mixtral-shaped attention the output error at 1.0 equals the amax scale's for K/V peaks from ~0.4 to ~500
(a few outliers past 448 saturate harmlessly) and grows only beyond: +25% at a peak of 0.1, 4x at 0.03, 10x
at ~1,600. ``kv_scale_from_amax`` turns an observed largest magnitude
into a scale (the quality tool uses it to show what calibration would give). The scales are host floats:
fixed before the CUDA graphs are captured, they are baked into them like any other launch argument.
"""

from __future__ import annotations

import torch

from mixtral.kernels.reference import paged_attention_reference
from mixtral.quant.fp8 import FP8, scale_from_amax, to_fp8

KV_FP8 = FP8


def kv_scale_from_amax(amax: float) -> float:
    """The scale that maps a layer's largest observed K (or V) magnitude to 448."""
    return float(scale_from_amax(torch.tensor(amax)))


def quantize_kv(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x (any float dtype) -> e4m3 codes of x / scale."""
    return to_fp8(x, torch.tensor(scale, dtype=torch.float32, device=x.device))


def dequantize_kv(codes: torch.Tensor, scale: float) -> torch.Tensor:
    """e4m3 codes -> the fp32 values they stand for."""
    return codes.float() * scale


def write_kv_fp8_reference(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """k/v [N, KV, hd] -> the FP8 caches at slot_mapping [N] (-1 skips), as codes of k / k_scale, v / v_scale."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = quantize_kv(k[valid], k_scale)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = quantize_kv(v[valid], v_scale)


def paged_attention_fp8_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_tables: torch.Tensor, context_lens: torch.Tensor,
                                  query_start_loc: torch.Tensor, sliding_window: int | None = None,
                                  k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """``reference.paged_attention_reference`` over the dequantized caches, in fp32, rounded to q's dtype."""
    out = paged_attention_reference(q.float(), dequantize_kv(k_cache, k_scale), dequantize_kv(v_cache, v_scale),
                                    block_tables, context_lens, query_start_loc, sliding_window)
    return out.to(q.dtype)

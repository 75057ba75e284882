"""FP8 KV cache: the PyTorch reference of storing and attending over float8_e4m3fn K/V with per-layer scales.

Layout (vLLM's ``--kv-cache-dtype fp8``): the paged caches [num_blocks, block_size, KV, hd] hold e4m3 codes,
code = round(x / scale) saturated to +-448, with one fp32 ``k_scale`` and one ``v_scale`` per layer; the value
a code stands for is code * scale. The Triton kernels (write_kv.py, rope.py's fused store, paged_attention.py,
paged_decode.py) are held to these functions.

Where the scales come from (decided here, as vLLM does): a checkpoint that carries them (compressed-tensors
``kv_cache_scheme``: ``self_attn.k_scale`` / ``v_scale``; AutoFP8 ``kv_cache_scheme: "static"``:
``k_proj.output_scale`` / ``v_proj.output_scale``; see checkpoint/fp8_formats.kv_scale_names), else 1.0.
With 1.0, values up to 448 are kept and the relative rounding is 2^-4 above 2^-6 (Mixtral's K and V sit in
roughly +-30); ``kv_scale_from_amax`` turns an observed largest magnitude into a scale for calibration.
The scales are host floats: fixed after loading, they are baked into a captured CUDA graph like any other
launch argument.
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

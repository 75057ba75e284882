"""Dispatch for the fused ops the model and engine call: the fastest implementation for the device.

Every op has a PyTorch reference in ``kernels/reference.py``; GPU kernels live in ``kernels/triton``. On a
CUDA tensor with Triton importable the Triton kernel runs, anywhere else the reference (CPU, or a GPU box
without Triton). ``MIXTRAL_KERNELS=reference`` forces the reference everywhere (debugging a kernel).
Callers (model/moe.py, engine/model_runner.py) import only this module.

``fused_moe`` is the experts path model/moe.py registers as ``EXPERT_PATHS["triton"]``.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from mixtral.kernels import reference


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether the Triton package can be imported (it is an optional ``gpu`` extra)."""
    return importlib.util.find_spec("triton") is not None


def use_triton(t: torch.Tensor) -> bool:
    """True when ``t`` lives on a CUDA device, Triton is installed and MIXTRAL_KERNELS is not 'reference'."""
    return t.is_cuda and triton_available() and os.environ.get("MIXTRAL_KERNELS", "") != "reference"


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k/v [N, KV, hd] -> k_cache/v_cache [num_blocks, block_size, KV, hd] at slot_mapping [N] (-1 skips)."""
    if use_triton(k_cache):
        from mixtral.kernels.triton.write_kv import write_kv as write_kv_triton

        write_kv_triton(k, v, k_cache, v_cache, slot_mapping)
        return
    reference.write_kv_reference(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, query_start_loc: torch.Tensor, *, max_query_len: int,
                    max_context_len: int, sliding_window: int | None = None) -> torch.Tensor:
    """Ragged causal attention over paged K/V; see ``reference.paged_attention_reference`` for the layout.

    q [N, H, hd]; block_tables [S, max_blocks] int32; context_lens [S]; query_start_loc [S + 1].
    ``max_query_len`` / ``max_context_len`` are host ints (1 for pure decode) so kernels pick a launch
    shape without reading device memory; they must bound the true lengths (a CUDA graph captured with
    them is valid for every batch whose lengths stay within them).
    """
    if use_triton(q):
        from mixtral.kernels.triton.paged_attention import paged_attention as paged_attention_triton

        return paged_attention_triton(q, k_cache, v_cache, block_tables, context_lens, query_start_loc,
                                      max_query_len=max_query_len, max_context_len=max_context_len,
                                      sliding_window=sliding_window)
    return reference.paged_attention_reference(q, k_cache, v_cache, block_tables, context_lens, query_start_loc,
                                               sliding_window)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, expert_start: int = 0) -> torch.Tensor:
    """The experts of a MoE layer: x [N, D], w13 [E, 2F, D], w2 [E, D, F], topk_weights [N, k] fp32,
    topk_ids [N, k] global ids -> [N, D]. The Triton fused kernel on CUDA, ``moe_reference`` elsewhere."""
    if use_triton(x):
        from mixtral.kernels.triton.fused_moe import fused_moe as fused_moe_triton

        return fused_moe_triton(x, w13, w2, topk_weights, topk_ids, expert_start)
    return reference.moe_reference(x, w13, w2, topk_weights, topk_ids, expert_start)

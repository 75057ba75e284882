"""Dispatch for the fused ops the model and engine call: the fastest implementation for the device.

Every op has a PyTorch reference in ``kernels/reference.py``; GPU kernels in ``kernels/triton`` register
here. Callers (model/moe.py, engine/model_runner.py) import only this module.
"""

from __future__ import annotations

import torch

from mixtral.kernels import reference


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k/v [N, KV, hd] -> k_cache/v_cache [num_blocks, block_size, KV, hd] at slot_mapping [N] (-1 skips)."""
    reference.write_kv_reference(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, query_start_loc: torch.Tensor, *, max_query_len: int,
                    max_context_len: int, sliding_window: int | None = None) -> torch.Tensor:
    """Ragged causal attention over paged K/V; see ``reference.paged_attention_reference`` for the layout.

    q [N, H, hd]; block_tables [S, max_blocks] int32; context_lens [S]; query_start_loc [S + 1].
    ``max_query_len`` / ``max_context_len`` are host ints (1 for pure decode) so kernels pick a launch
    shape without reading device memory.
    """
    del max_query_len, max_context_len  # the reference reads the lengths itself
    return reference.paged_attention_reference(q, k_cache, v_cache, block_tables, context_lens, query_start_loc,
                                               sliding_window)

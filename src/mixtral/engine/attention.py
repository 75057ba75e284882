"""PagedAttentionContext: the model's attention context over the engine's paged KV cache.

One forward pass processes a flat ragged batch: the new tokens of every scheduled sequence, concatenated
(prefill chunks and single decode tokens alike). Each layer stores the new K/V at ``slot_mapping`` and
attends over the sequence's blocks, both through the model's ``kernels/dispatch.Kernels`` (passed in as
``kernels``) so GPU kernels can take over.

Layout example (block_size 4): sequences A (3 tokens already cached, 1 new) and B (prompt of 5, all new):
positions [3, 0, 1, 2, 3, 4]; query_start_loc [0, 1, 6]; context_lens [4, 5]; with block tables
A: [2], B: [0, 5] the slots are [2*4+3, 0, 1, 2, 3, 5*4+0] = [11, 0, 1, 2, 3, 20].

An FP8 cache (``EngineConfig.kv_cache_dtype="fp8"``) holds codes; ``kv_scales[layer]`` = (k_scale, v_scale)
are host floats handed to every store and read of that layer (a CUDA graph bakes them in at capture). The
dense prefill path attends over this step's fresh K/V, not the cache: for a prompt's first chunk that is the
unquantized K/V (slightly more exact); every later chunk and decode step reads the codes from the cache.
"""

from __future__ import annotations

import torch

from mixtral.kernels.dispatch import Kernels


class PagedAttentionContext:
    """Implements ``mixtral.model.context.AttentionContext`` over paged blocks."""

    def __init__(self, *, positions: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, query_start_loc: torch.Tensor, max_query_len: int,
                 max_context_len: int, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], kernels: Kernels,
                 sliding_window: int | None = None, expert_counts: torch.Tensor | None = None,
                 fresh_prompt_lens: list[int] | None = None, dense_min_tokens: int | None = None,
                 kv_scales: list[tuple[float, float]] | None = None) -> None:
        self.positions = positions  # [N] int64
        self.slot_mapping = slot_mapping  # [N] int64, -1 = do not store (padding)
        self.block_tables = block_tables  # [S, max_blocks] int32
        self.context_lens = context_lens  # [S] int32, tokens of each sequence after this step
        self.query_start_loc = query_start_loc  # [S + 1] int32
        # Host ints: kernels choose launch shapes from these without reading device memory.
        self.max_query_len = max_query_len
        self.max_context_len = max_context_len
        self.kv_caches = kv_caches  # per layer (k_cache, v_cache), each [num_blocks, block_size, KV, hd]
        self.kernels = kernels  # the model's: its KernelConfig decides the attention implementations too
        self.sliding_window = sliding_window
        self.expert_counts = expert_counts  # [L, E] int64 or None
        # Host ints, set when no sequence of the step has tokens cached before this step's: each attends over
        # its new tokens only, which a dense causal kernel can do without the block tables.
        self.fresh_prompt_lens = fresh_prompt_lens
        # Shortest prompt the dense path takes (None: dispatch.DENSE_PREFILL_MIN_TOKENS; a prefill graph passes
        # less).
        self.dense_min_tokens = dense_min_tokens
        # Per layer (k_scale, v_scale) of an FP8 cache; None: 1.0 (unused by caches in the model's dtype).
        self.kv_scales = kv_scales

    def _scales(self, layer_idx: int) -> tuple[float, float]:
        return self.kv_scales[layer_idx] if self.kv_scales is not None else (1.0, 1.0)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [N, H, hd], k/v [N, KV, hd] (k already rotated) -> [N, H, hd]."""
        k_cache, v_cache = self.kv_caches[layer_idx]
        scales = self._scales(layer_idx)
        self.kernels.write_kv(k, v, k_cache, v_cache, self.slot_mapping, *scales)
        return self._attend_stored(q, k, v, k_cache, v_cache, scales)

    def rope_attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor) -> torch.Tensor:
        """``attend`` for q/k before RoPE: the rotation and the K/V store are one kernel on CUDA
        (``Kernels.rope_qk_store``), then the same attention. The model calls this where a context offers it."""
        k_cache, v_cache = self.kv_caches[layer_idx]
        scales = self._scales(layer_idx)
        q, k = self.kernels.rope_qk_store(q, k, v, cos, sin, k_cache, v_cache, self.slot_mapping, scales)
        return self._attend_stored(q, k, v, k_cache, v_cache, scales)

    def _attend_stored(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, scales: tuple[float, float]) -> torch.Tensor:
        """Attention once this step's K/V are in the layer's caches."""
        if self.fresh_prompt_lens is not None:
            out = self.kernels.dense_prefill_attention(q, k, v, self.fresh_prompt_lens, self.sliding_window,
                                                       self.dense_min_tokens)
            if out is not None:
                return out
        return self.kernels.paged_attention(
            q, k_cache, v_cache, self.block_tables, self.context_lens, self.query_start_loc,
            max_query_len=self.max_query_len, max_context_len=self.max_context_len,
            sliding_window=self.sliding_window, k_scale=scales[0], v_scale=scales[1],
        )

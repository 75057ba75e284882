"""A rectangular KV cache and its attention context: the unpaged ground truth ``engine_testing.greedy_reference``
decodes with (one request, prefill then one token a step), against which the paged engine is compared.
Test code only: the engine pages its cache (``mixtral.engine.attention.PagedAttentionContext``).
"""

from __future__ import annotations

import torch

from mixtral.model.context import causal_mask, sdpa_gqa


class ContiguousKVCache:
    """A rectangular cache [L, B, max_len, KV, hd] for B sequences that advance together."""

    def __init__(self, n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (n_layers, batch, max_len, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.batch, self.max_len = batch, max_len


class ContiguousKVContext:
    """Appends T new tokens per sequence at ``start`` into a ContiguousKVCache and attends causally."""

    def __init__(self, cache: ContiguousKVCache, start: int, seq_len: int, sliding_window: int | None = None,
                 expert_counts: torch.Tensor | None = None) -> None:
        if start + seq_len > cache.max_len:
            raise ValueError(f"cache holds {cache.max_len} tokens; asked to write up to {start + seq_len}")
        self.cache, self.start, self.seq_len = cache, start, seq_len
        self.sliding_window = sliding_window
        device = cache.k.device
        self.positions = (torch.arange(seq_len, device=device) + start).repeat(cache.batch)  # [B*T]
        self.expert_counts = expert_counts

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, t, s = self.cache.batch, self.seq_len, self.start
        kc, vc = self.cache.k[layer_idx], self.cache.v[layer_idx]  # [B, max_len, KV, hd]
        kc[:, s:s + t] = k.view(b, t, *k.shape[1:])
        vc[:, s:s + t] = v.view(b, t, *v.shape[1:])
        q4 = q.view(b, t, *q.shape[1:]).transpose(1, 2)  # [B, H, T, hd]
        k4 = kc[:, : s + t].transpose(1, 2)  # [B, KV, S+T, hd]
        v4 = vc[:, : s + t].transpose(1, 2)
        mask = causal_mask(t, s + t, s, self.sliding_window, q.device)
        out = sdpa_gqa(q4, k4, v4, mask, is_causal=False)
        return out.transpose(1, 2).reshape(b * t, *q.shape[1:])

"""Attention contexts: how a forward pass reads and writes K/V, passed explicitly to the model.

The model computes q/k/v for a flat batch of tokens and asks its context to attend. A context decides
where K/V live: nowhere (``DenseContext``, full sequences, training and parity tests) or paged blocks (the
engine's ``PagedAttentionContext`` in ``mixtral.engine``). No global state: every call receives its context.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionContext(Protocol):
    """What the model needs from a context for one forward pass over N flat tokens."""

    positions: torch.Tensor  # [N] int64, position of each token in its sequence

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [N, H, hd], k/v [N, KV, hd] for the new tokens (q and k rotated) -> attention output [N, H, hd].

        A context may also offer ``rope_attend(layer_idx, q, k, v, cos, sin)`` taking q/k before RoPE; the model
        then calls that instead (the engine's paged context fuses RoPE with its K/V store)."""
        ...


def routing_counter(ctx: object, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(this layer's row [E] of ``ctx.expert_counts`` [L, E], ``ctx.routing_mask`` [N]) when the context keeps
    counts, else (None, None). The mask (1 = count, 0 = skip), when present, leaves out padding rows (CUDA-graph
    batches padded to a captured size)."""
    counts = getattr(ctx, "expert_counts", None)
    if counts is None:
        return None, None
    return counts[layer_idx], getattr(ctx, "routing_mask", None)


def causal_mask(t_q: int, t_k: int, offset: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean [t_q, t_k] mask; query i (absolute position offset + i) sees keys j <= offset + i."""
    qpos = torch.arange(t_q, device=device)[:, None] + offset
    kpos = torch.arange(t_k, device=device)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    return mask


def sdpa_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
             is_causal: bool) -> torch.Tensor:
    """q [B, H, Tq, hd], k/v [B, KV, Tk, hd] -> [B, H, Tq, hd] without materialising repeated K/V."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal and mask is None, enable_gqa=q.shape[1] != k.shape[1],
        scale=q.shape[-1] ** -0.5,
    )


class DenseContext:
    """Full sequences of equal length T, no cache: tokens are laid out row-major as [B, T]."""

    def __init__(self, batch: int, seq_len: int, device: torch.device, sliding_window: int | None = None,
                 expert_counts: torch.Tensor | None = None) -> None:
        self.batch, self.seq_len, self.sliding_window = batch, seq_len, sliding_window
        self.positions = torch.arange(seq_len, device=device).repeat(batch)  # [B*T]
        self.expert_counts = expert_counts

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, t = self.batch, self.seq_len
        q4 = q.view(b, t, *q.shape[1:]).transpose(1, 2)  # [B, H, T, hd]
        k4 = k.view(b, t, *k.shape[1:]).transpose(1, 2)  # [B, KV, T, hd]
        v4 = v.view(b, t, *v.shape[1:]).transpose(1, 2)
        mask = None
        if self.sliding_window is not None and self.sliding_window < t:
            mask = causal_mask(t, t, 0, self.sliding_window, q.device)
        out = sdpa_gqa(q4, k4, v4, mask, is_causal=True)  # [B, H, T, hd]
        return out.transpose(1, 2).reshape(b * t, *q.shape[1:])

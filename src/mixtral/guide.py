"""The contract between the engine and constrained decoding (tool calls, JSON schema).

A ``TokenGuide`` holds one sequence's grammar state. Before each sampling step the engine asks every
guided sequence to fill its row of a packed bitmask (int32 words, bit ``i % 32`` of word ``i // 32`` set
means token ``i`` is allowed). The engine fills the rows on worker threads while the GPU runs the forward
pass, applies the masks to the logits, samples, and reports the chosen token back with ``accept_token``.
Implementations live in ``mixtral.serve.guided``; the engine knows only this protocol.
"""

from __future__ import annotations

from typing import Protocol

import torch


def bitmask_words(vocab_size: int) -> int:
    """Number of int32 words a bitmask row over ``vocab_size`` tokens needs."""
    return (vocab_size + 31) // 32


class TokenGuide(Protocol):
    def fill_bitmask(self, bitmask_row: torch.Tensor) -> None:
        """Write the allowed next tokens into ``bitmask_row`` (int32 [bitmask_words(V)], CPU)."""
        ...

    def accept_token(self, token_id: int) -> None:
        """Advance the grammar by the sampled token (it was allowed by the last mask)."""
        ...

    def is_finished(self) -> bool:
        """True once the grammar accepts no further tokens: the sequence stops with reason 'stop'."""
        ...

    def copy(self) -> TokenGuide:
        """An independent guide in the same state (for n > 1 samples of one prompt)."""
        ...


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [B, V], bitmask int32 [B, W] on the same device -> logits with disallowed tokens at -inf.

    Reference implementation in plain PyTorch (runs on CPU and GPU without host syncs).
    """
    vocab = logits.shape[-1]
    bits = torch.arange(32, device=bitmask.device, dtype=torch.int32)  # [32]
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).bool().flatten(-2)[..., :vocab]  # [B, V]
    return logits.masked_fill(~allowed, float("-inf"))

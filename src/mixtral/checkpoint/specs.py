"""Tensor specs: how one on-disk tensor maps onto a piece of one internal parameter.

Both checkpoint formats split the model's fused parameters into the same pieces (q/k/v rows of ``wqkv``,
w1/w3 rows of one expert's ``w13``, one expert's ``w2``), so a piece is identified by its *key*
``(param, index)`` independent of the format. Loading, saving and converting are then one loop over specs:
``param[spec.index] <- to_internal(tensor)`` or ``tensor <- from_internal(param[spec.index])``.

This file knows nothing about files; ``hf.py`` and ``consolidated.py`` list the specs of their format.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# One index entry per leading dim of the parameter: an int selects (an expert), a (start, stop) pair slices
# rows. Kept as plain tuples so a spec is hashable and two formats' pieces compare equal.
IndexEntry = int | tuple[int, int]
PieceKey = tuple[str, tuple[IndexEntry, ...]]


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: its name and shape on disk, and the internal piece it fills."""

    name: str
    shape: tuple[int, ...]
    param: str  # internal parameter name, e.g. "layers.0.attention.wqkv.weight"
    index: tuple[IndexEntry, ...] = ()  # () = the whole parameter
    # Mistral consolidated wq/wk: rows hold RoPE pairs interleaved (2i, 2i+1) per head; this many heads.
    rope_heads: int = 0

    @property
    def key(self) -> PieceKey:
        return (self.param, self.index)

    def select(self, param: torch.Tensor) -> torch.Tensor:
        """The view of ``param`` this tensor occupies (writes through)."""
        idx = tuple(slice(*i) if isinstance(i, tuple) else i for i in self.index)
        return param[idx] if idx else param

    def to_internal(self, t: torch.Tensor) -> torch.Tensor:
        """On-disk layout -> internal layout (only consolidated wq/wk differ)."""
        return interleaved_to_half(t, self.rope_heads) if self.rope_heads else t

    def from_internal(self, t: torch.Tensor) -> torch.Tensor:
        """Internal layout -> on-disk layout."""
        return half_to_interleaved(t, self.rope_heads) if self.rope_heads else t


def moe_specs(experts: str, gate: str, layer: int, num_experts: int, dim: int, ffn: int) -> list[TensorSpec]:
    """A layer's expert and router tensors, named ``{experts}.{e}.w1/w3/w2.weight`` and ``gate`` on disk (both
    formats share this shape), in internal parameter order: w13 pieces, w2 pieces, then the router (MoE
    registers w13/w2 itself and the gate in a child module)."""
    me = f"layers.{layer}.feed_forward"
    w13, w2 = f"{me}.w13", f"{me}.w2"  # [E, 2F, D], [E, D, F]
    specs: list[TensorSpec] = []
    for e in range(num_experts):
        specs.append(TensorSpec(f"{experts}.{e}.w1.weight", (ffn, dim), w13, (e, (0, ffn))))
        specs.append(TensorSpec(f"{experts}.{e}.w3.weight", (ffn, dim), w13, (e, (ffn, 2 * ffn))))
    specs += [TensorSpec(f"{experts}.{e}.w2.weight", (dim, ffn), w2, (e,)) for e in range(num_experts)]
    specs.append(TensorSpec(gate, (num_experts, dim), f"{me}.gate.weight"))
    return specs


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Mistral wq/wk rows -> HF rotate_half rows, per head.

    w [n_heads * hd, D]. Mistral pairs rows (2i, 2i+1) of a head; rotate_half pairs (i, i + hd/2). Viewing a
    head's rows as [hd/2, 2] and transposing to [2, hd/2] puts the even rows first and the odd rows second.
    Example, hd=4: rows (0, 1, 2, 3) -> (0, 2, 1, 3).
    """
    rows, dim = w.shape
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`interleaved_to_half`. Example, hd=4: rows (0, 1, 2, 3) -> (0, 2, 1, 3)."""
    rows, dim = w.shape
    hd = rows // n_heads
    return w.reshape(n_heads, 2, hd // 2, dim).transpose(1, 2).reshape(rows, dim)

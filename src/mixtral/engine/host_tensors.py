"""Python lists -> CPU tensors, fast: how every step's host-built inputs become tensors.

The engine builds a step's inputs (token ids, positions, KV slots, lengths, sampling settings) as Python lists,
one entry per token or sequence. ``torch.tensor(list)`` converts them element by element through the generic
sequence protocol, ~100 ns an element: at 512 decoding sequences the step's few thousand values cost most of a
millisecond. Packing the list into an ``array.array`` (a C loop) and viewing its buffer as a tensor costs about
a quarter of that. The tensor shares the array's memory and keeps it alive; it is a fresh object, owned by the
caller.

Not for nested lists (flatten first) nor for values outside the dtype's range (``array`` raises
``OverflowError``, where ``torch.tensor`` would too).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

import torch

# array type codes of the dtypes used; "i" is 4 bytes and "q" 8 on every platform torch supports.
_CODES = {torch.int64: "q", torch.int32: "i", torch.float32: "f", torch.float64: "d"}


def host_tensor(values: Iterable[int] | Iterable[float], dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A 1-D CPU tensor of ``dtype`` holding ``values`` (int64, int32, float32 or float64)."""
    packed = array(_CODES[dtype], values)
    if not packed:
        return torch.empty(0, dtype=dtype)  # frombuffer refuses an empty buffer
    return torch.frombuffer(packed, dtype=dtype)

"""Placing a checkpoint piece of a quantized weight into its parameter's stored tensors.

A :class:`TensorSpec` index addresses a piece of an internal parameter ``[*lead, out, in]``: one entry per
leading dim (an int selects an expert, a (start, stop) pair slices experts) and, last, a (start, stop) slice
of logical output rows. For a quantized parameter the same piece is, in every stored tensor, the view that
``StoredTensor.rows`` gives for those rows (``in_only`` tensors such as act-order's ``perm`` have no rows:
the whole per-expert vector). Example: w13 [E, 2F, D] in int4 g128, piece (3, (F, 2F)) (expert 3's w3) is
``qweight[3, F:2F, :]`` and ``scales[3, F:2F, :]``.

Not here: which pieces a format has (hf.py, gguf_file.py, awq.py, gptq.py, ct_packed.py).
"""

from __future__ import annotations

import torch

from mixtral.checkpoint.specs import IndexEntry
from mixtral.quant.base import QuantTensors, StoredTensor


def piece_view(t: torch.Tensor, stored: StoredTensor, index: tuple[IndexEntry, ...], n_lead: int) -> torch.Tensor:
    """The view of stored tensor ``t`` that the piece ``index`` occupies (writes through)."""
    view, dim = t, 0
    for pos, entry in enumerate(index):
        if pos < n_lead:
            if isinstance(entry, int):
                view = view.select(dim, entry)
            else:
                view = view.narrow(dim, entry[0], entry[1] - entry[0])
                dim += 1
        else:
            if isinstance(entry, int):
                raise ValueError(f"index {index}: the output-row entry must be a (start, stop) slice")
            view = stored.rows(view, entry[0], entry[1])
    return view


def write_piece(dst: QuantTensors, stored: list[StoredTensor], index: tuple[IndexEntry, ...], n_lead: int,
                piece: QuantTensors) -> None:
    """Copy a piece's stored tensors into the parameter's (shapes must agree; every stored tensor is written)."""
    missing = [s.name for s in stored if s.name not in piece]
    if missing:
        raise ValueError(f"piece lacks stored tensor(s) {missing}")
    for s in stored:
        view = piece_view(dst[s.name], s, index, n_lead)
        if view.shape != piece[s.name].shape:
            raise ValueError(f"piece {index}: {s.name} has shape {tuple(piece[s.name].shape)}, its place in the "
                             f"parameter {tuple(view.shape)}")
        if s.in_only and bool(view.any()) and not torch.equal(view, piece[s.name]):
            # Rows of one weight (q/k/v, an expert's w1/w3) share its input permutation: GPTQ derives it from
            # the input's statistics, which those rows share; a checkpoint where they differ cannot be fused.
            raise ValueError(f"piece {index}: its {s.name} differs from the one already placed for the same "
                             "weight; act-order pieces of one fused weight must share their g_idx")
        view.copy_(piece[s.name])


def allocate(stored: list[StoredTensor], lead: tuple[int, ...], out_features: int, in_features: int,
             device: torch.device | str = "cpu") -> QuantTensors:
    """Empty stored tensors of a [*lead, out, in] weight (zero-filled: a piece never written reads as 0)."""
    return {s.name: torch.zeros(s.shape(lead, out_features, in_features), dtype=s.dtype, device=device)
            for s in stored}

"""Helpers for the integer checkpoint tests: independent packers/dequantizers written from each format's
documentation (not from the reader's code), and a reader over an in-memory or safetensors state dict."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from mixtral.checkpoint.safetensors_io import read_header


def pack_bits_int32(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned codes along ``dim`` (0: rows, 1: columns), ``32 / bits`` per int32, field j at bits
    ``bits * j``: GPTQ's qweight (dim 0) and qzeros (dim 1)."""
    k = 32 // bits
    c = codes.to(torch.int64)
    if dim == 0:
        c = c.T
    rows, cols = c.shape
    words = torch.zeros(rows, cols // k, dtype=torch.int64)
    for j in range(k):
        words |= c[:, j::k] << (bits * j)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.T.contiguous() if dim == 0 else words


def gptq_reference(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                   bits: int, v1: bool) -> torch.Tensor:
    """GPTQ's dequantization, element by element along the packing: w[n, i] = s[g, n] (q[i, n] - z[g, n]),
    g = g_idx[i], in the scale dtype; v1 zero points are stored minus one. Returns [out, in]."""
    k, mask = 32 // bits, (1 << bits) - 1
    q = torch.stack([(qweight.to(torch.int64) >> (bits * j)) & mask for j in range(k)], dim=1)  # [in/k, k, out]
    q = q.reshape(-1, qweight.shape[1])  # [in, out]
    z = torch.stack([(qzeros.to(torch.int64) >> (bits * j)) & mask for j in range(k)], dim=2)  # [G, out/k, k]
    z = z.reshape(qzeros.shape[0], -1) + (1 if v1 else 0)  # [G, out]
    g = g_idx.to(torch.int64)
    w = (q - z[g]).to(scales.dtype) * scales[g]  # [in, out]
    return w.T


class DictReader:
    """``read(name)`` over a state dict, and its header info (name -> (dtype, shape))."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.info = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}

    def read(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def saved_reader(tensors: dict[str, torch.Tensor], folder: Path) -> tuple[dict, Callable[[str], torch.Tensor]]:
    """Write ``tensors`` to a safetensors file and return (header info, read) over the file itself."""
    from safetensors import safe_open

    path = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    info = {k: (v.dtype, v.shape) for k, v in read_header(path).items()}

    def read(name: str) -> torch.Tensor:
        with safe_open(str(path), "pt") as fh:
            if name not in fh.keys():  # noqa: SIM118 (safe_open has no __contains__)
                raise KeyError(name)
            return fh.get_tensor(name)

    return info, read

"""The safetensors file format, read header-first and written tensor by tensor.

Reading: the header (8-byte little-endian length, then JSON ``{name: {dtype, shape, data_offsets}}``) is
parsed here so a checkpoint can be validated — names, shapes, truncation — before any data is read; the
data itself is read through ``safetensors.safe_open`` (mmap), one tensor at a time.
Writing: ``safetensors.torch.save_file`` needs every tensor in memory at once, so :func:`write_safetensors`
writes the header from the planned shapes, then streams each tensor's bytes as it is produced.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mixtral.checkpoint.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class TensorInfo:
    """What a file's header says about one tensor."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header: every tensor's bytes must lie inside the file.

    A file cut short (an interrupted download) fails here, naming the first tensor whose data is missing.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is {size} bytes, too short to be a safetensors file (truncated?)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{path}: header claims {n} bytes but the file holds {size}; the file is truncated or not safetensors"
            )
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    data_size = size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}") from exc
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if end - begin != nbytes:
            raise CheckpointError(
                f"{path}: tensor {name!r} ({entry['dtype']} {list(shape)}) should take {nbytes} bytes but its "
                f"offsets span {end - begin}"
            )
        if end > data_size:
            raise CheckpointError(
                f"{path}: tensor {name!r} ends at data byte {end} but the file holds only {data_size} data bytes; "
                "the file is truncated (re-download or re-convert it)"
            )
        out[name] = TensorInfo(dtype, shape, path)
    return out


class LazySlice:
    """A safetensors tensor seen through ``narrow``: the ranges are recorded, and ``load()`` reads only them.

    What a tensor-parallel rank hands to ``StoredTensor.rows`` / ``cols`` (quant/base.py) in place of the tensor,
    so the same slicing rules pick the bytes to read.
    """

    def __init__(self, source: Any, shape: tuple[int, ...], ranges: tuple[tuple[int, int], ...] | None = None) -> None:
        self.source = source
        self.ranges = ranges if ranges is not None else tuple((0, n) for n in shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.ranges)

    def dim(self) -> int:
        return len(self.ranges)

    def narrow(self, dim: int, start: int, length: int) -> LazySlice:
        a, b = self.ranges[dim]
        if start < 0 or length < 0 or a + start + length > b:
            raise IndexError(f"narrow({dim}, {start}, {length}) is outside a dimension of size {b - a}")
        ranges = list(self.ranges)
        ranges[dim] = (a + start, a + start + length)
        return LazySlice(self.source, (), tuple(ranges))

    def load(self) -> torch.Tensor:
        return self.source[tuple(slice(a, b) for a, b in self.ranges)] if self.ranges else self.source[:]


class SafetensorsReader:
    """Open safetensors files lazily and read single tensors through mmap.

    A file done with is closed (:meth:`close_file`) so its mapped pages stop counting against the process;
    :meth:`close` closes the rest.
    """

    def __init__(self) -> None:
        self._handles: dict[tuple[Path, str], Any] = {}

    def get(self, path: Path, name: str, device: torch.device) -> torch.Tensor:
        # safetensors reads straight onto a CUDA device; anything else goes through the CPU.
        dev = str(device) if device.type in ("cpu", "cuda") else "cpu"
        handle = self._handles.get((path, dev))
        if handle is None:
            handle = safe_open(str(path), framework="pt", device=dev).__enter__()
            self._handles[(path, dev)] = handle
        return handle.get_tensor(name).to(device)

    def get_slice(self, path: Path, name: str) -> Any:
        """safetensors' lazy slice of one tensor: indexing it with slices reads only those bytes (sharded loads)."""
        handle = self._handles.get((path, "cpu"))
        if handle is None:
            handle = self._handles[(path, "cpu")] = safe_open(str(path), framework="pt", device="cpu").__enter__()
        return handle.get_slice(name)

    def close_file(self, path: Path) -> None:
        for key in [k for k in self._handles if k[0] == path]:
            self._handles.pop(key).__exit__(None, None, None)

    def open_files(self) -> list[Path]:
        return sorted({k[0] for k in self._handles})

    def close(self) -> None:
        for path in self.open_files():
            self.close_file(path)


def write_safetensors(path: Path, entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                      produce: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file whose tensors are produced one at a time, in ``entries`` order.

    Host memory stays near one tensor. The file is written under a temporary name and renamed at the end,
    so an interrupted write never leaves a file that looks complete. Returns the data bytes written.
    """
    entries = list(entries)
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)))
            fh.write(blob)
            for name, dtype, shape in entries:
                t = produce(name)
                if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    raise ValueError(f"tensor {name!r}: planned {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}")
                # Raw bytes without a numpy dtype (numpy has no bfloat16).
                fh.write(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return offset

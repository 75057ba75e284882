"""Our safetensors header parser and streaming writer agree with the safetensors library."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixtral.checkpoint.safetensors_io import read_header, write_safetensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.bf16": torch.randn(7, 13, generator=g).bfloat16(),
        "b.fp32": torch.randn(3, 5, 2, generator=g),
        "c.fp16": torch.randn(1001, generator=g).half(),
        "d.scalar": torch.tensor(3.5),
        "e.empty": torch.zeros(0, 4),
    }


def test_streaming_writer_is_read_back_by_safetensors(tmp_path: Path) -> None:
    tensors = _tensors()
    produced: list[str] = []

    def produce(name: str) -> torch.Tensor:
        produced.append(name)
        return tensors[name]

    path = tmp_path / "w.safetensors"
    write_safetensors(path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], produce)
    assert produced == list(tensors)  # one at a time, in order
    back = load_file(path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())
    assert not list(tmp_path.glob("*.partial"))


def test_writer_refuses_a_tensor_that_differs_from_the_plan(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    with pytest.raises(ValueError, match="planned"):
        write_safetensors(path, [("x", torch.float32, (2, 2))], lambda name: torch.zeros(2, 3))
    assert not path.exists() and not list(tmp_path.iterdir())  # nothing half-written is left behind


def test_header_of_a_library_written_file(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, tmp_path / "lib.safetensors")
    info = read_header(tmp_path / "lib.safetensors")
    assert {k: (i.dtype, i.shape) for k, i in info.items()} == {k: (v.dtype, tuple(v.shape)) for k, v in
                                                                tensors.items()}

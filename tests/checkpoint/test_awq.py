"""AWQ (AutoAWQ GEMM layout) -> canonical int4: held to AutoAWQ's dequantization, written from its layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from int_testing import DictReader, saved_reader

from mixtral.checkpoint import int_formats
from mixtral.checkpoint.awq import pack_awq, unpack_awq
from mixtral.checkpoint.errors import CheckpointError
from mixtral.checkpoint.specs import TensorSpec
from mixtral.quant import QuantSpec, get_method
from mixtral.quant.int_layout import IntFormat, dequantize

AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # output column j of a word is nibble AWQ_REVERSE_ORDER[j]


def awq_reference(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """AutoAWQ's ``dequantize_gemm``: unpack nibbles 0..7 of each int32, put them back in column order, then
    (q - z) * s in fp16, [in, out]; returned transposed to [out, in]."""
    def unpack(p: torch.Tensor) -> torch.Tensor:
        n = torch.stack([(p >> (4 * k)) & 0xF for k in range(8)], dim=-1)  # [R, C/8, 8] nibble k
        return n[..., list(AWQ_REVERSE_ORDER)].reshape(p.shape[0], -1)

    q, z = unpack(qweight), unpack(qzeros)
    w = (q - z.repeat_interleave(group, 0)).to(torch.float16) * scales.repeat_interleave(group, 0)
    return w.T


def test_awq_word_layout_worked_example() -> None:
    """Columns 0..7 holding codes 1..8 pack as nibbles (low to high) 1, 3, 5, 7, 2, 4, 6, 8: 0x86427531."""
    codes = torch.arange(1, 9, dtype=torch.uint8)[None]
    word = pack_awq(codes)
    assert word.dtype == torch.int32 and int(word) == 0x86427531 - 2**32
    assert torch.equal(unpack_awq(word), codes)


def _awq_module(out_f: int, in_f: int, group: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (in_f, out_f), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (in_f // group, out_f), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(in_f // group, out_f, generator=gen) * 0.01 + 1e-3).half()
    return {"qweight": pack_awq(codes), "qzeros": pack_awq(zeros), "scales": scales}


def test_awq_linear_dequantizes_as_autoawq(tmp_path: Path) -> None:
    qspec = QuantSpec("int4", "awq", group_size=32, symmetric=False, checkpoint_format="gemm")
    spec = TensorSpec("model.layers.0.self_attn.q_proj.weight", (64, 128), "layers.0.attention.wqkv.weight",
                      ((0, 64),))
    module = _awq_module(64, 128, 32, seed=0)
    tensors = {f"model.layers.0.self_attn.q_proj.{k}": v for k, v in module.items()}
    info, read = saved_reader(tensors, tmp_path)
    assert int_formats.check_piece(spec, qspec, info) == []
    refined = int_formats.refine_spec(qspec, [spec], info, read)
    assert refined.scale_dtype == torch.float16 and not refined.act_order
    method = get_method(refined)
    assert method.format == IntFormat(4, 32, torch.float16, "int")
    piece = int_formats.read_piece(spec, refined, read)
    assert {k: tuple(v.shape) for k, v in piece.items()} == {
        s.name: s.shape((), 64, 128) for s in method.stored()}
    expected = awq_reference(module["qweight"], module["qzeros"], module["scales"], 32)
    assert torch.equal(dequantize(piece, torch.float16), expected)


def test_awq_header_problems_and_symmetric_refused() -> None:
    qspec = QuantSpec("int4", "awq", group_size=32, symmetric=False)
    spec = TensorSpec("m.q_proj.weight", (64, 128), "p")
    good = {f"m.q_proj.{k}": v for k, v in _awq_module(64, 128, 32, 1).items()}
    bad = dict(good)
    del bad["m.q_proj.qzeros"]
    bad["m.q_proj.scales"] = torch.zeros(4, 32, dtype=torch.float16)
    bad["m.q_proj.qweight"] = bad["m.q_proj.qweight"].float()
    problems = int_formats.check_piece(spec, qspec, DictReader(bad).info)
    assert any("'m.q_proj.qzeros' is missing" in p for p in problems)
    assert any("'m.q_proj.scales' has shape [4, 32], expected [4, 64]" in p for p in problems)
    assert any("'m.q_proj.qweight' has dtype torch.float32, expected torch.int32" in p for p in problems)
    with pytest.raises(CheckpointError, match="without zero points"):
        int_formats.check_piece(spec, QuantSpec("int4", "awq", group_size=32, symmetric=True), DictReader(good).info)

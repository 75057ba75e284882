"""compressed-tensors int checkpoints -> canonical int tensors: written by the library's own compressors and held
to its own decompression, bit for bit."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from int_testing import saved_reader

from mixtral.checkpoint import int_formats
from mixtral.checkpoint.specs import TensorSpec
from mixtral.quant import QuantSpec, get_method
from mixtral.quant.int_layout import IntFormat, dequantize


def _ct() -> SimpleNamespace:
    """compressed-tensors, imported on first use: it imports triton, which at collection time would come before
    tests/kernels' conftest turns the interpreter on."""
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    return SimpleNamespace(Int=IntQuantizationCompressor, Packed=PackedQuantizationCompressor,
                           pack_to_int32=pack_to_int32, Args=QuantizationArgs, Scheme=QuantizationScheme,
                           calculate_qparams=calculate_qparams)


MODULE = "model.layers.1.block_sparse_moe.experts.2.w2"
SPEC = TensorSpec(f"{MODULE}.weight", (48, 128), "layers.1.feed_forward.w2", (2,))


def _compress(w: torch.Tensor, bits: int, group: int, symmetric: bool, compressor: type | None = None
              ) -> tuple[dict[str, torch.Tensor], object]:
    """One linear compressed by compressed-tensors (its own qparams, quantize and packing)."""
    ct = _ct()
    compressor = compressor or ct.Packed
    strategy = "group" if group else "channel"
    args = ct.Args(num_bits=bits, type="int", strategy=strategy, group_size=group or None, symmetric=symmetric)
    scheme = ct.Scheme(targets=["Linear"], weights=args)
    g = w.float().reshape(w.shape[0], -1, group or w.shape[1])
    scale, zp = ct.calculate_qparams(g.amin(-1), g.amax(-1), args)  # [out, G]
    state = {"weight": w, "weight_scale": scale.to(w.dtype)}
    if not symmetric:
        state["weight_zero_point"] = zp
    return compressor.compress(state, scheme), scheme


CASES = [(4, 32, True, torch.bfloat16), (4, 64, False, torch.float16), (8, 0, True, torch.bfloat16),
         (8, 32, False, torch.bfloat16), (4, 0, False, torch.float16)]


@pytest.mark.parametrize(("bits", "group", "symmetric", "dtype"), CASES)
def test_pack_quantized_matches_the_library(bits: int, group: int, symmetric: bool, dtype: torch.dtype,
                                            tmp_path: Path) -> None:
    w = (torch.randn(48, 128, generator=torch.Generator().manual_seed(bits + group)) * 0.05).to(dtype)
    compressed, scheme = _compress(w, bits, group, symmetric)
    expected = _ct().Packed.decompress(compressed, scheme)["weight"]  # [out, in] in dtype
    info, read = saved_reader({f"{MODULE}.{k}": v for k, v in compressed.items()}, tmp_path)
    qspec = QuantSpec(f"int{bits}", "compressed-tensors", group_size=group, symmetric=symmetric,
                      checkpoint_format="pack-quantized")
    assert int_formats.check_piece(SPEC, qspec, info) == []
    refined = int_formats.refine_spec(qspec, [SPEC], info, read)
    assert refined.scale_dtype == dtype
    method = get_method(refined)
    assert method.format == IntFormat(bits, group, dtype, "none" if symmetric else "int")
    piece = int_formats.read_piece(SPEC, refined, read)
    assert IntFormat.of(piece) == method.format
    assert torch.equal(dequantize(piece, dtype), expected)


def test_int_quantized_8bit_matches_the_library(tmp_path: Path) -> None:
    w = torch.randn(48, 128, dtype=torch.bfloat16) * 0.05
    ct = _ct()
    compressed, scheme = _compress(w, 8, 0, True, ct.Int)
    assert compressed["weight"].dtype == torch.int8
    expected = ct.Int.decompress(compressed, scheme)["weight"]
    info, read = saved_reader({f"{MODULE}.{k}": v for k, v in compressed.items()}, tmp_path)
    qspec = QuantSpec("int8", "compressed-tensors", group_size=0, checkpoint_format="int-quantized")
    assert int_formats.check_piece(SPEC, qspec, info) == []
    piece = int_formats.read_piece(SPEC, int_formats.refine_spec(qspec, [SPEC], info, read), read)
    assert torch.equal(dequantize(piece, torch.bfloat16), expected)


def test_group_act_order_g_idx(tmp_path: Path) -> None:
    """``actorder: group`` checkpoints carry weight_g_idx (the library's current compressor no longer applies
    it, so the reference here is the documented rule: column i uses group g_idx[i])."""
    gen = torch.Generator().manual_seed(3)
    out_f, in_f, group = 48, 128, 32
    order = torch.randperm(in_f, generator=gen)
    g_idx = torch.empty(in_f, dtype=torch.int32)
    g_idx[order] = (torch.arange(in_f) // group).to(torch.int32)
    q = torch.randint(-8, 8, (out_f, in_f), generator=gen, dtype=torch.int8)
    scale = (torch.rand(out_f, in_f // group, generator=gen) * 0.01 + 1e-3).to(torch.bfloat16)
    tensors = {"weight_packed": _ct().pack_to_int32(q, 4), "weight_scale": scale, "weight_g_idx": g_idx,
               "weight_shape": torch.tensor([out_f, in_f])}
    info, read = saved_reader({f"{MODULE}.{k}": v for k, v in tensors.items()}, tmp_path)
    qspec = QuantSpec("int4", "compressed-tensors", group_size=group, act_order=True,
                      checkpoint_format="pack-quantized")
    assert int_formats.check_piece(SPEC, qspec, info) == []
    refined = int_formats.refine_spec(qspec, [SPEC], info, read)
    assert refined.act_order
    piece = int_formats.read_piece(SPEC, refined, read)
    expected = (q.to(torch.bfloat16) * scale[:, g_idx.long()])
    assert torch.equal(dequantize(piece, torch.bfloat16), expected)


def test_missing_zero_point_and_bad_packing_shape_named() -> None:
    compressed, _ = _compress(torch.randn(48, 128) * 0.05, 4, 32, False)
    info = {f"{MODULE}.{k}": (v.dtype, tuple(v.shape)) for k, v in compressed.items()}
    del info[f"{MODULE}.weight_zero_point"]
    info[f"{MODULE}.weight_packed"] = (torch.int32, (48, 8))
    qspec = QuantSpec("int4", "compressed-tensors", group_size=32, symmetric=False, checkpoint_format="pack-quantized")
    problems = int_formats.check_piece(SPEC, qspec, info)
    assert any("weight_zero_point' is missing" in p for p in problems)
    assert any("weight_packed' has shape [48, 8], expected [48, 16]" in p for p in problems)

"""The canonical integer layout: packing, round-to-nearest, act-order permutation, slicing and exact conversions."""

from __future__ import annotations

import pytest
import torch

from mixtral.quant.int_layout import (
    IntFormat,
    code_values,
    common_format,
    convert,
    dequantize,
    pack_int4,
    permute_columns,
    quantize_rtn,
    sort_by_group,
    unpack_int4,
)

FORMATS = [
    IntFormat(4, 128, torch.float16, "none"),
    IntFormat(4, 32, torch.float16, "int"),
    IntFormat(4, 0, torch.bfloat16, "int"),
    IntFormat(8, 0, torch.float16, "none"),
    IntFormat(8, 64, torch.float32, "int"),
]


def test_pack_unpack_round_trip_and_nibble_order() -> None:
    codes = torch.randint(0, 16, (3, 5, 8), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (3, 5, 4) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    assert int(pack_int4(torch.tensor([3, 12]))[0]) == 3 | (12 << 4)  # column 0 low nibble, column 1 high


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_rtn_shapes_follow_stored_and_error_is_half_a_step(fmt: IntFormat) -> None:
    torch.manual_seed(0)
    w = torch.randn(2, 48, 256) * 0.05
    t = quantize_rtn(w, fmt)
    assert IntFormat.of(t) == fmt
    for s in fmt.stored():
        assert tuple(t[s.name].shape) == s.shape((2,), 48, 256), s.name
        assert t[s.name].dtype == s.dtype
    err = (dequantize(t, torch.float32) - w).abs()
    g = fmt.group_size or 256
    step = t["scales"].float().reshape(2, 48, -1).repeat_interleave(g, -1)
    assert bool((err <= step * 0.5 + 1e-6).all())


def test_rtn_rows_are_independent_and_column_slices_match() -> None:
    """Quantizing rows [a, b) equals slicing the quantized whole; a group-aligned column slice of every stored
    tensor dequantizes to the same columns of the whole (the tensor-parallel slicing rule)."""
    fmt = IntFormat(4, 32, torch.float16, "int")
    w = torch.randn(64, 128)
    whole = quantize_rtn(w, fmt)
    part = quantize_rtn(w[16:40], fmt)
    for s in fmt.stored():
        assert torch.equal(s.rows(whole[s.name], 16, 40), part[s.name])
    cols = {s.name: s.cols(whole[s.name], 64, 128) for s in fmt.stored()}
    assert torch.equal(dequantize(cols, torch.float32), dequantize(whole, torch.float32)[:, 64:])


def test_all_zero_group_and_symmetric_codes_in_range() -> None:
    w = torch.zeros(4, 64)
    w[1, :32] = torch.linspace(-1, 1, 32)
    t = quantize_rtn(w, IntFormat(4, 32, torch.float16, "none"))
    assert torch.equal(dequantize(t, torch.float32)[0], torch.zeros(64))
    v = code_values(t)
    assert int(v.min()) >= -7 and int(v.max()) <= 7  # absmax / 7: -8 unused, nothing clipped
    assert float(dequantize(t, torch.float32)[1, 31]) == pytest.approx(1.0, rel=1e-3)


def test_shape_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="does not divide in_features 192"):
        quantize_rtn(torch.randn(4, 192), IntFormat(4, 128))
    with pytest.raises(ValueError, match="4 or 8 bits"):
        IntFormat(3, 128)
    with pytest.raises(ValueError, match="zero must be"):
        IntFormat(4, 128, zero="asym")


def _act_order_case(in_features: int = 128, g: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A GPTQ-style act-order g_idx: column perm_act[i] belongs to group i // g."""
    perm_act = torch.randperm(in_features)
    g_idx = torch.empty(in_features, dtype=torch.int64)
    g_idx[perm_act] = torch.arange(in_features) // g
    codes = torch.randint(0, 16, (8, in_features), dtype=torch.uint8)  # logical column order
    return g_idx, codes, perm_act


def test_act_order_permutation_is_exact() -> None:
    torch.manual_seed(1)
    g = 32
    g_idx, codes, _ = _act_order_case(g=g)
    scales = torch.rand(8, 128 // g).half() + 0.01
    zeros = torch.randint(0, 16, (8, 128 // g), dtype=torch.uint8)
    # The file's own dequantization: column j uses group g_idx[j].
    expected = ((codes.float() - zeros.float()[:, g_idx]) * scales.float()[:, g_idx]).half()
    perm = sort_by_group(g_idx, g)
    assert perm is not None
    t = {"qweight": pack_int4(permute_columns(codes, perm)), "scales": scales, "zeros": zeros,
         "perm": perm.to(torch.int32)}
    assert IntFormat.of(t).act_order
    assert torch.equal(dequantize(t, torch.float16), expected)


def test_sort_by_group_identity_and_bad_g_idx() -> None:
    assert sort_by_group(torch.arange(64) // 32, 32) is None
    bad = torch.zeros(64, dtype=torch.int64)
    with pytest.raises(ValueError, match="exactly 32 columns"):
        sort_by_group(bad, 32)


def _random_stored(fmt: IntFormat, out_features: int, in_features: int) -> dict[str, torch.Tensor]:
    groups = in_features // fmt.group_size if fmt.group_size else 0
    shape = (out_features, groups) if groups else (out_features,)
    t: dict[str, torch.Tensor] = {}
    if fmt.bits == 4:
        t["qweight"] = pack_int4(torch.randint(0, 16, (out_features, in_features)))
    else:
        t["qweight"] = torch.randint(-128, 128, (out_features, in_features), dtype=torch.int8)
    t["scales"] = (torch.rand(shape) * 0.01 + 1e-3).to(fmt.scale_dtype)
    if fmt.zero == "int":
        hi = 16 if fmt.bits == 4 else 128
        t["zeros"] = torch.randint(0 if fmt.bits == 4 else -128, hi, shape).to(fmt.zero_dtype)
    elif fmt.zero == "float":
        t["offsets"] = (torch.randn(shape) * 0.01).to(fmt.scale_dtype)
    return t


# GGUF Q4_K_M mixes: wq Q4_K with wk/wv Q8_0; Q4_0 with Q8_0; per-channel int8 with group int4.
MIXES = [
    [IntFormat(4, 32, torch.float32, "float"), IntFormat(8, 32, torch.float16, "none")],
    [IntFormat(4, 32, torch.float16, "none"), IntFormat(8, 32, torch.float16, "none")],
    [IntFormat(4, 32, torch.float16, "int"), IntFormat(8, 0, torch.float16, "none")],
    [IntFormat(4, 32, torch.float32, "float"), IntFormat(8, 16, torch.float32, "none")],
    [IntFormat(4, 128, torch.float16, "int"), IntFormat(4, 128, torch.bfloat16, "int")],
]


@pytest.mark.parametrize("formats", MIXES, ids=lambda fs: "+".join(f"{f.bits}b{f.group_size}{f.zero}" for f in fs))
def test_common_format_holds_each_piece_exactly(formats: list[IntFormat]) -> None:
    torch.manual_seed(2)
    dst = common_format(formats)
    for fmt in formats:
        t = _random_stored(fmt, 16, 128)
        converted = convert(t, dst)
        assert IntFormat.of(converted) == dst
        assert torch.equal(dequantize(converted, torch.float32), dequantize(t, torch.float32)), fmt


def test_convert_refuses_lossy_targets() -> None:
    t = _random_stored(IntFormat(8, 32, torch.float16, "none"), 4, 64)
    with pytest.raises(ValueError, match="cannot hold 8-bit codes in 4 bits"):
        convert(t, IntFormat(4, 32, torch.float16, "none"))
    with pytest.raises(ValueError, match="cannot be re-expressed"):
        convert(t, IntFormat(8, 64, torch.float16, "none"))
    f = _random_stored(IntFormat(4, 32, torch.float32, "float"), 4, 64)
    with pytest.raises(ValueError, match="float offsets"):
        convert(f, IntFormat(8, 32, torch.float32, "int"))

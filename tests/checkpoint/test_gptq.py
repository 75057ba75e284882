"""GPTQ -> canonical int4 / int8: held to GPTQ's dequantization (g_idx, v1 zero points), act-order included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from int_testing import DictReader, gptq_reference, pack_bits_int32, saved_reader

from mixtral.checkpoint import int_formats
from mixtral.checkpoint.errors import CheckpointError
from mixtral.checkpoint.gptq import unpack_cols, unpack_rows
from mixtral.checkpoint.quant_pieces import allocate, write_piece
from mixtral.checkpoint.specs import TensorSpec, moe_specs
from mixtral.quant import QuantSpec, get_method
from mixtral.quant.int_layout import IntFormat, dequantize


def _gptq_module(out_f: int, in_f: int, bits: int, group: int, act_order: bool, sym: bool, v1: bool,
                 seed: int, g_idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One GPTQ linear as the quantizer writes it: codes in logical column order, g_idx from the act-order
    permutation (column perm[i] in group i // group), zero points stored minus one in v1."""
    gen = torch.Generator().manual_seed(seed)
    groups = in_f // group if group else 1
    q = torch.randint(0, 1 << bits, (in_f, out_f), generator=gen)
    mid = 1 << (bits - 1)
    z = torch.full((groups, out_f), mid) if sym else torch.randint(0, 1 << bits, (groups, out_f), generator=gen)
    stored_z = (z - 1) & ((1 << bits) - 1) if v1 else z  # v1: z - 1, masked (0 wraps to 2^bits - 1)
    if g_idx is None and group and act_order:
        order = torch.randperm(in_f, generator=gen)
        g_idx = torch.empty(in_f, dtype=torch.int32)
        g_idx[order] = (torch.arange(in_f) // group).to(torch.int32)
    elif g_idx is None:
        g_idx = (torch.arange(in_f) // (group or in_f)).to(torch.int32)
    return {"qweight": pack_bits_int32(q, bits, 0), "qzeros": pack_bits_int32(stored_z, bits, 1),
            "scales": (torch.rand(groups, out_f, generator=gen) * 0.01 + 1e-3).half(), "g_idx": g_idx}


def test_pack_fields_worked_example() -> None:
    """4-bit rows 0..7 of one column holding 1..8 are the int32 0x87654321 (row i at bits 4i)."""
    q = torch.arange(1, 9)[:, None]
    word = pack_bits_int32(q, 4, 0)
    assert int(word) == 0x87654321 - 2**32
    assert torch.equal(unpack_rows(word, 4), q.to(torch.int32))
    assert torch.equal(unpack_cols(pack_bits_int32(q.T, 8, 1)[:, :1], 8), q.T[:, :4].to(torch.int32))


CASES = [
    dict(bits=4, group=32, act_order=True, sym=False, v1=True),
    dict(bits=4, group=32, act_order=False, sym=True, v1=True),
    dict(bits=4, group=0, act_order=False, sym=False, v1=False),
    dict(bits=8, group=64, act_order=True, sym=True, v1=True),
    dict(bits=8, group=32, act_order=False, sym=False, v1=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_gptq_linear_dequantizes_as_gptq(case: dict, tmp_path: Path) -> None:
    bits, group = case["bits"], case["group"]
    qspec = QuantSpec(f"int{bits}", "gptq", group_size=group, symmetric=case["sym"], act_order=case["act_order"],
                      checkpoint_format="gptq" if case["v1"] else "gptq_v2")
    spec = TensorSpec("model.layers.0.self_attn.o_proj.weight", (64, 128), "layers.0.attention.wo.weight")
    module = _gptq_module(64, 128, bits, group, case["act_order"], case["sym"], case["v1"], seed=bits + group)
    tensors = {f"model.layers.0.self_attn.o_proj.{k}": v for k, v in module.items()}
    info, read = saved_reader(tensors, tmp_path)
    assert int_formats.check_piece(spec, qspec, info) == []
    refined = int_formats.refine_spec(qspec, [spec], info, read)
    assert refined.act_order == case["act_order"]
    method = get_method(refined)
    piece = int_formats.read_piece(spec, refined, read)
    assert IntFormat.of(piece) == method.format
    expected = gptq_reference(module["qweight"], module["qzeros"], module["scales"], module["g_idx"], bits, case["v1"])
    assert torch.equal(dequantize(piece, torch.float16), expected)


def test_v1_zero_of_zero_reads_as_sixteen() -> None:
    """A v1 file whose true zero was 0 stores 15 (0 - 1 masked): loaders read 16, and so does this reader."""
    qspec = QuantSpec("int4", "gptq", group_size=32, symmetric=False, checkpoint_format="gptq")
    spec = TensorSpec("m.weight", (8, 32), "p")
    module = _gptq_module(8, 32, 4, 32, False, False, True, seed=5)
    module["qzeros"] = pack_bits_int32(torch.full((1, 8), 15), 4, 1)
    piece = int_formats.read_piece(spec, qspec, DictReader({f"m.{k}": v for k, v in module.items()}).read)
    assert int(piece["zeros"].max()) == 16
    assert torch.equal(dequantize(piece, torch.float16),
                       gptq_reference(module["qweight"], module["qzeros"], module["scales"], module["g_idx"], 4, True))


def test_symmetric_with_wrong_zero_and_bad_g_idx_are_named() -> None:
    spec = TensorSpec("m.weight", (8, 64), "p")
    module = _gptq_module(8, 64, 4, 32, False, False, False, seed=6)
    reader = DictReader({f"m.{k}": v for k, v in module.items()})
    with pytest.raises(CheckpointError, match="sym=true, but it has zero point"):
        int_formats.read_piece(spec, QuantSpec("int4", "gptq", 32, True, checkpoint_format="gptq_v2"), reader.read)
    reader.tensors["m.g_idx"] = torch.zeros(64, dtype=torch.int32)
    with pytest.raises(CheckpointError, match="exactly 32 columns"):
        int_formats.read_piece(spec, QuantSpec("int4", "gptq", 32, False, act_order=True), reader.read)


def _act_order_g_idx(in_f: int, group: int, seed: int) -> torch.Tensor:
    order = torch.randperm(in_f, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(in_f, dtype=torch.int32)
    g_idx[order] = (torch.arange(in_f) // group).to(torch.int32)
    return g_idx


def test_moe_experts_fill_w13_and_w2_with_act_order() -> None:
    """Every expert's w1/w3/w2 placed into the stacked parameters through the method's stored tensors
    dequantizes to the per-expert references. Each expert has its own act-order permutation, shared by its w1
    and w3 (GPTQ derives it from the expert's inputs); a w3 with another g_idx is refused."""
    e, d, f = 3, 64, 96
    qspec = QuantSpec("int4", "gptq", group_size=32, symmetric=False, act_order=True, checkpoint_format="gptq")
    specs = [s for s in moe_specs("experts", "gate.weight", 0, e, d, f) if not s.param.endswith("gate.weight")]
    tensors, expected = {}, {}
    for i, s in enumerate(specs):
        expert = int(s.name.split(".")[1])
        g_idx = _act_order_g_idx(s.shape[1], 32, seed=expert if s.name.endswith(("w1.weight", "w3.weight")) else 50 + i)
        module = _gptq_module(*s.shape, 4, 32, True, False, True, seed=100 + i, g_idx=g_idx)
        tensors.update({f"{s.name.removesuffix('.weight')}.{k}": v for k, v in module.items()})
        expected[s.name] = gptq_reference(module["qweight"], module["qzeros"], module["scales"], g_idx, 4, True)
    reader = DictReader(tensors)
    assert all(int_formats.check_piece(s, qspec, reader.info) == [] for s in specs)
    refined = int_formats.refine_spec(qspec, specs, reader.info, reader.read)
    method = get_method(refined)
    params = {"layers.0.feed_forward.w13": allocate(method.stored(), (e,), 2 * f, d),
              "layers.0.feed_forward.w2": allocate(method.stored(), (e,), d, f)}
    want = {"layers.0.feed_forward.w13": torch.zeros(e, 2 * f, d, dtype=torch.float16),
            "layers.0.feed_forward.w2": torch.zeros(e, d, f, dtype=torch.float16)}
    for s in specs:
        write_piece(params[s.param], method.stored(), s.index, 1, int_formats.read_piece(s, refined, reader.read))
        s.select(want[s.param]).copy_(expected[s.name])
    for name, buf in params.items():
        assert torch.equal(dequantize(buf, torch.float16), want[name]), name
    w3 = next(s for s in specs if s.name == "experts.1.w3.weight")
    other = _gptq_module(*w3.shape, 4, 32, True, False, True, seed=7, g_idx=_act_order_g_idx(d, 32, seed=99))
    piece = int_formats.read_piece(w3, refined, DictReader({f"experts.1.w3.{k}": v for k, v in other.items()}).read)
    with pytest.raises(ValueError, match="must share their g_idx"):
        write_piece(params["layers.0.feed_forward.w13"], method.stored(), w3.index, 1, piece)

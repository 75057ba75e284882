"""GGUF Mixtral files: config and tokenizer from the metadata, every weight equal to gguf's dequantization, both
expert layouts, and bad files refused before any weight is read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_testing import q4_k_m, write_gguf

from mixtral.checkpoint.errors import CheckpointError
from mixtral.checkpoint.gguf_file import GGUFCheckpoint
from mixtral.checkpoint.gguf_meta import packaged_pieces
from mixtral.checkpoint.quant_pieces import allocate, write_piece
from mixtral.model.args import ModelArgs
from mixtral.quant.int_layout import IntFormat, dequantize
from mixtral.quant.int_method import method_for_format

# K-quants need rows of 256 weights: dim, q_size and F are 256.
KQ_ARGS = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=256, vocab_size=32000,
                    num_experts=4, max_seq_len=4096, tokenizer="v1")
SMALL_ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, vocab_size=32768,
                       num_experts=4, max_seq_len=2048, tokenizer="v3")


def _load_params(ckpt: GGUFCheckpoint) -> dict[str, torch.Tensor]:
    """Every internal parameter assembled from its pieces (quantized ones through their method's stored
    tensors), dequantized to fp32: what a loaded model would hold."""
    args = ckpt.args
    d, qkv, f, e = args.dim, args.q_size + 2 * args.kv_size, args.hidden_dim, args.num_experts
    full_shapes = {"attention.wqkv.weight": (qkv, d), "feed_forward.w13": (e, 2 * f, d),
                   "feed_forward.w2": (e, d, f)}
    params: dict[str, torch.Tensor] = {}
    buffers: dict[str, dict[str, torch.Tensor]] = {}
    for s in ckpt.specs:
        shape = next((v for k, v in full_shapes.items() if s.param.endswith(k)), s.shape)
        fmt = ckpt.plan[s.param]
        piece = ckpt.read(s)
        if fmt is None:
            assert isinstance(piece, torch.Tensor)
            t = params.setdefault(s.param, torch.zeros(shape))
            s.select(t).copy_(piece)
        else:
            assert isinstance(piece, dict) and IntFormat.of(piece) == fmt
            stored = method_for_format(fmt).stored()
            buf = buffers.setdefault(s.param, allocate(stored, shape[:-2], shape[-2], shape[-1]))
            write_piece(buf, stored, s.index, len(shape) - 2, piece)
    for param, buf in buffers.items():
        params[param] = dequantize(buf, torch.float32)
    return params


def _expected_params(ckpt: GGUFCheckpoint, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    loaded = _load_params(ckpt)
    for s in ckpt.specs:
        t = out.setdefault(s.param, torch.zeros_like(loaded[s.param]))
        s.select(t).copy_(expected[s.name])
    return out


def test_q4_k_m_file_loads_every_weight_exactly(tmp_path: Path) -> None:
    path = tmp_path / "mixtral-q4_k_m.gguf"
    expected = write_gguf(path, KQ_ARGS, q4_k_m, merged=True)
    ckpt = GGUFCheckpoint(path)
    assert ckpt.args == KQ_ARGS
    assert ckpt.tokenizer == "v1" and ckpt.tokenizer_file.name == "tokenizer.model.v1"
    # wqkv mixes Q4_K (q) with Q8_0 (k, v): int8 codes with fp32 scales and offsets hold both exactly.
    assert ckpt.plan["layers.0.attention.wqkv.weight"] == IntFormat(8, 32, torch.float32, "float")
    assert ckpt.plan["layers.0.feed_forward.w13"] == IntFormat(4, 32, torch.float32, "float")
    assert ckpt.plan["layers.0.feed_forward.w2"] == IntFormat(8, 16, torch.float32, "none")  # Q6_K
    assert ckpt.plan["layers.1.feed_forward.w2"] == IntFormat(4, 32, torch.float32, "float")  # Q4_K
    assert ckpt.plan["tok_embeddings.weight"] is None and ckpt.plan["layers.0.feed_forward.gate.weight"] is None
    loaded = _load_params(ckpt)
    want = _expected_params(ckpt, expected)
    assert loaded.keys() == want.keys()
    for name in want:
        assert torch.equal(loaded[name], want[name]), name


def test_per_expert_layout_and_python_quantized_types(tmp_path: Path) -> None:
    """Older files: one tensor per expert. Q8_0 / Q4_0 / Q5_1 blocks from gguf's own quantizer, F16 norms."""
    def types(name: str) -> str:
        if name.endswith("norm.weight"):
            return "F16"
        if "ffn_gate_inp" in name:
            return "F32"
        parts = name.split(".")
        kind = parts[2] if len(parts) > 3 else ""
        return {"ffn_gate": "Q4_0", "ffn_up": "Q4_0", "ffn_down": "Q5_1"}.get(kind, "Q8_0")

    path = tmp_path / "mixtral-old.gguf"
    expected = write_gguf(path, SMALL_ARGS, types, merged=False)
    ckpt = GGUFCheckpoint(path)
    assert ckpt.tokenizer == "v3" and ckpt.args.vocab_size == 32768
    assert any(s.name == "blk.1.ffn_down.3.weight" for s in ckpt.specs)
    assert ckpt.plan["layers.0.feed_forward.w13"] == IntFormat(4, 32, torch.float16, "none")
    assert ckpt.plan["layers.0.feed_forward.w2"] == IntFormat(8, 32, torch.float16, "float")
    norm = ckpt.read(next(s for s in ckpt.specs if s.name == "blk.0.attn_norm.weight"))
    assert isinstance(norm, torch.Tensor) and norm.dtype == torch.float16
    loaded = _load_params(ckpt)
    want = _expected_params(ckpt, expected)
    for name in want:
        assert torch.equal(loaded[name], want[name]), name


def test_q_rows_are_un_interleaved(tmp_path: Path) -> None:
    """An F32 attn_q written the converter's way reads back as the HF-layout weight it came from."""
    path = tmp_path / "f32.gguf"
    expected = write_gguf(path, SMALL_ARGS, lambda name: "F32", seed=3)
    ckpt = GGUFCheckpoint(path)
    assert all(v is None for v in ckpt.plan.values())
    spec = next(s for s in ckpt.specs if s.name == "blk.1.attn_q.weight")
    got = ckpt.read(spec)
    rng_weights = expected["blk.1.attn_q.weight"]
    assert torch.equal(got, rng_weights)
    raw = torch.from_numpy(np.array(ckpt.tensors[spec.name].data)).reshape(spec.shape)
    assert not torch.equal(raw, rng_weights)  # the file really holds the interleaved rows


def test_unsupported_type_and_extra_tensor_fail_before_reading(tmp_path: Path) -> None:
    def types(name: str) -> str:
        return "IQ4_NL" if name == "blk.1.attn_output.weight" else "F32"

    path = tmp_path / "iq.gguf"
    extra = {"blk.9.attn_output.weight": ("Q8_0", np.zeros((4, 34), dtype=np.uint8))}
    write_gguf(path, SMALL_ARGS, types, extra=extra)
    with pytest.raises(CheckpointError, match=r"\(2 problem\(s\)\):\n  tensor 'blk.1.attn_output.weight' has GGUF type "
                                              r"IQ4_NL, which is not supported.*\n  unexpected tensor 'blk.9"):
        GGUFCheckpoint(path)


def test_metadata_and_tokenizer_errors(tmp_path: Path) -> None:
    tokens = list(packaged_pieces("v1"))
    tokens[1234] = "▁surprise"
    path = tmp_path / "tok.gguf"
    write_gguf(path, KQ_ARGS.replace(dim=64, hidden_dim=64, head_dim=16), lambda n: "F32", tokens=tokens)
    with pytest.raises(CheckpointError, match=r"closest is v1 \(32000 tokens\), which first differs at id 1234: "
                                              r"file has '▁surprise'"):
        GGUFCheckpoint(path)
    missing = tmp_path / "nope.gguf"
    with pytest.raises(CheckpointError, match="does not exist"):
        GGUFCheckpoint(missing)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(CheckpointError, match="cannot read"):
        GGUFCheckpoint(junk)

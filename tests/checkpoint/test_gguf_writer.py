"""The GGUF writer (checkpoint/gguf_writer.py, ``mixtral convert --to gguf``): gguf's own reader accepts the file
(types, metadata, shapes), our reader loads it back to gguf's dequantization of every tensor, that is the source
model's weights within each type's rounding, a float file gives the source model's logits exactly, and what
cannot be written is refused before a file is left behind. (That llama.cpp runs such a file is
tests/unit/test_cpu_compare.py's ``peers`` test.)"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from mixtral.checkpoint.gguf_file import GGUFCheckpoint
from mixtral.checkpoint.gguf_writer import convert_to_gguf, tensor_type, write_gguf
from mixtral.checkpoint.loader import load_model
from mixtral.checkpoint.specs import interleaved_to_half
from mixtral.checkpoint.writer import RandomSource, save_checkpoint
from mixtral.cli.main import main
from mixtral.model.args import ModelArgs
from mixtral.model.mixtral import Transformer, init_random_weights

# Rows of 64 and 96: multiples of every block (32); head_dim 16 != dim / heads needs the key_length key.
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=16, hidden_dim=96, vocab_size=32000,
                 num_experts=4, max_seq_len=256, tokenizer="v1")
# Largest error of one weight per type, as a fraction of its block's largest magnitude: half a step (Q4_0 / Q5_0 map
# the signed extreme to -8 / -16 steps, so the other sign's extreme clips by a whole step), plus the step's own
# rounding to fp16 (relative 2^-11) times the largest code.
HALF_STEP = {"Q8_0": (0.5 + 127 * 2**-11) / 127, "Q4_0": (1 + 8 * 2**-11) / 8,
             "BF16": 2**-8, "F16": 2**-11, "F32": 1e-7}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Transformer]:
    """An fp32 HF checkpoint of ARGS (random weights) and the model it holds."""
    model = Transformer(ARGS)
    init_random_weights(model, seed=4, std=0.05)
    folder = save_checkpoint(model, ARGS, tmp_path_factory.mktemp("hf"), "hf")
    return folder, model.eval()


def _gguf_tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (GGUF type, fp32 weights in the file's layout) as gguf's reader and dequantizer see them."""
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        shape = tuple(reversed([int(x) for x in t.shape]))
        out[t.name] = (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape))
    return out


@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_0", "bf16"])
def test_round_trip_through_gguf_and_our_reader(source: tuple[Path, Transformer], tmp_path: Path,
                                                gguf_type: str) -> None:
    folder, model = source
    path = convert_to_gguf(folder, tmp_path / "m.gguf", gguf_type, dtype=torch.bfloat16)
    theirs = _gguf_tensors(path)
    reader = gguf.GGUFReader(path)
    meta = {name: f.contents() for name, f in reader.fields.items()}
    assert meta["general.architecture"] == "llama" and meta["llama.expert_count"] == 4
    assert meta["llama.attention.key_length"] == 16 and meta["general.file_type"] is not None
    assert len(meta["tokenizer.ggml.scores"]) == len(meta["tokenizer.ggml.token_type"]) == ARGS.vocab_size
    ckpt = GGUFCheckpoint(path, quantized=False)
    assert ckpt.args == ARGS and ckpt.tokenizer == "v1"
    params = dict(model.named_parameters())
    for spec in ckpt.specs:
        kind, deq = theirs[spec.name]
        assert kind == tensor_type(spec.name, gguf_type, "bf16")
        if gguf_type != "f32":
            assert kind == ("F32" if spec.name.endswith(("norm.weight", "ffn_gate_inp.weight")) else
                            gguf_type.upper() if spec.name.endswith(("attn_q.weight", "attn_k.weight", "attn_v.weight",
                                                                      "attn_output.weight", "_exps.weight"))
                            else "BF16")
        want = torch.from_numpy(np.array(deq, dtype=np.float32))
        if spec.rope_heads:
            want = interleaved_to_half(want, spec.rope_heads)
        got = ckpt.read(spec)
        assert isinstance(got, torch.Tensor)
        assert torch.equal(got.float(), want), spec.name  # our reader == gguf's dequantization
        source_w = spec.select(params[spec.param]).detach()
        scale = source_w.abs().max()
        assert (got.float() - source_w).abs().max() <= HALF_STEP[kind] * scale * 1.01 + 1e-7, spec.name


def test_quantized_file_loads_as_int_weights(source: tuple[Path, Transformer], tmp_path: Path) -> None:
    """Loaded for running, a Q4_0 file's projections are int4 in groups of 32 (what llama.cpp multiplies)."""
    from mixtral.model.quantized import quant_scheme, quant_weights

    folder, _ = source
    path = convert_to_gguf(folder, tmp_path / "m.gguf", "q4_0")
    model = load_model(path, "cpu", torch.float32)
    assert quant_scheme(model) == "int4"
    fmts = {m.method.format.group_size for _, m in quant_weights(model)}
    assert fmts == {32}


def test_float_file_gives_the_source_logits(source: tuple[Path, Transformer], tmp_path: Path) -> None:
    folder, model = source
    path = convert_to_gguf(folder, tmp_path / "m.gguf", "f32")
    ids = torch.tensor([[1, 22557, 1526, 28725, 910]])
    with torch.no_grad():
        torch.testing.assert_close(load_model(path, "cpu", torch.float32)(ids), model(ids), rtol=0, atol=0)


def test_preset_pieces_stream_in_model_order(tmp_path: Path) -> None:
    """A preset's random weights come one parameter at a time, in the model's order (RandomSource refuses any
    other): the writer reads them so, and the file holds init_random_weights' numbers."""
    path = write_gguf(RandomSource(ARGS, seed=3), ARGS, tmp_path / "p.gguf", "f32", "f32")
    model = Transformer(ARGS)
    init_random_weights(model, seed=3)
    ids = torch.tensor([[1, 5, 9, 200]])
    with torch.no_grad():
        torch.testing.assert_close(load_model(path, "cpu", torch.float32)(ids), model(ids), rtol=0, atol=0)


def test_refusals_leave_no_file(source: tuple[Path, Transformer], tmp_path: Path) -> None:
    folder, _ = source
    with pytest.raises(ValueError, match="q3_k"):
        convert_to_gguf(folder, tmp_path / "a.gguf", "q3_k")
    odd = ModelArgs(dim=48, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=12, hidden_dim=72, vocab_size=32000,
                    num_experts=2, max_seq_len=64, tokenizer="v1")
    with pytest.raises(ValueError, match="blocks of 32 weights; a row of 48"):
        write_gguf(RandomSource(odd), odd, tmp_path / "b.gguf", "q8_0", "f32")
    assert not (tmp_path / "b.gguf").exists() and not (tmp_path / "a.gguf").exists()
    gguf_file = convert_to_gguf(folder, tmp_path / "c.gguf", "f16")
    with pytest.raises(ValueError, match="GGUF file already"):
        convert_to_gguf(gguf_file, tmp_path / "d.gguf", "q8_0")


def test_cli_convert_to_gguf(source: tuple[Path, Transformer], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder, _ = source
    out = tmp_path / "cli.gguf"
    assert main(["convert", str(folder), str(out), "--to", "gguf", "--gguf-type", "q8_0", "--dtype", "bf16"]) == 0
    assert GGUFCheckpoint(out).plan["layers.0.feed_forward.w13"] is not None
    assert main(["convert", str(folder), str(out), "--to", "gguf", "--gguf-type", "q8_0"]) == 1  # exists
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", str(folder), str(out), "--to", "gguf", "--gguf-type", "q4_0", "--overwrite"]) == 0
    assert main(["convert", str(folder), str(tmp_path / "x"), "--to", "gguf"]) == 1  # not a .gguf name
    assert main(["convert", str(folder), str(tmp_path / "y"), "--to", "hf", "--gguf-type", "q8_0"]) == 1

"""GGUF files load through ``load_model`` (a .gguf path, or a folder holding one) into the quantized model: the
projections and experts stay quantized in their types' exact formats, the router, norms, embeddings and lm_head
float; its logits equal the fp32 model built from gguf's own dequantization; the tokenizer is matched from the
file's metadata; a conflicting ``--quantization`` fails naming both."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from gguf_testing import q4_k_m, write_gguf
from quant_ckpt_testing import float_model

from mixtral.checkpoint.gguf_file import gguf_specs
from mixtral.checkpoint.loader import load_model, resolve
from mixtral.checkpoint.quant_config import QuantConfigError
from mixtral.model.args import ModelArgs
from mixtral.model.quantized import quant_weights
from mixtral.quant.int_layout import IntFormat

# K-quants need rows of 256 weights.
KQ_ARGS = ModelArgs(dim=256, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=256, vocab_size=32000,
                    num_experts=4, max_seq_len=4096, tokenizer="v1")
SMALL_ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, vocab_size=32768,
                       num_experts=4, max_seq_len=2048, tokenizer="v3")


def _old_types(name: str) -> str:
    if name.endswith("norm.weight") or "ffn_gate_inp" in name:
        return "F32"
    parts = name.split(".")
    return {"ffn_gate": "Q4_0", "ffn_up": "Q4_0", "ffn_down": "Q8_0"}.get(parts[2] if len(parts) > 3 else "", "Q8_0")


@pytest.mark.parametrize(("args", "types", "merged"), [(KQ_ARGS, q4_k_m, True), (SMALL_ARGS, _old_types, False)],
                         ids=["q4_k_m-merged", "q4_0-q8_0-per-expert"])
def test_gguf_loads_as_gguf_dequantizes_it(args: ModelArgs, types, merged: bool, tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    expected = write_gguf(path, args, types, merged=merged)
    source = resolve(str(path))
    assert source.format == "gguf" and source.args == args.replace(norm_eps=source.args.norm_eps)
    assert source.tokenizer_file is not None and source.tokenizer_file.name.endswith(args.tokenizer)
    model = load_model(str(path), "cpu", torch.float32)
    qweights = dict(quant_weights(model))
    assert len(qweights) == 4 * args.n_layers
    assert model.output.weight.dtype == torch.float32  # the lm_head stays float (dequantized from the file)
    if merged:  # Q4_K gate/up, Q6_K down in layer 0, Q8_0 k/v beside Q4_K q
        assert qweights["layers.0.feed_forward.w13"].method.format == IntFormat(4, 32, torch.float32, "float")
        assert qweights["layers.0.feed_forward.w2"].method.format == IntFormat(8, 16, torch.float32, "none")
    ref = float_model(source.args, expected, gguf_specs(source.args, merged), internal=True)
    ids = torch.randint(0, args.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids), rtol=1e-4, atol=1e-4)
    # a folder holding one GGUF file is the same model
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(path, folder / "mixtral-q4.gguf")
    assert resolve(str(folder)).format == "gguf"
    with pytest.raises(QuantConfigError, match=r"--quantization 'int4' conflicts with .*GGUF"):
        load_model(str(folder), quantization="int4")
    # info plans the same quantized weights, from the header alone
    from mixtral.cli.info import model_info
    from mixtral.model.footprint import weight_bytes

    info = model_info(str(path))
    methods = {p + (".weight" if p.endswith(("wqkv", "wo")) else ""): q.method for p, q in qweights.items()}
    assert info["memory_plan"]["weight_bytes"]["total"] == weight_bytes(args, torch.bfloat16, methods)["total"]
    assert info["checkpoint_bytes"] == path.stat().st_size

"""``mixtral convert SRC DST --to hf --quantization fp8`` writes a compressed-tensors float-quantized checkpoint
that (i) loads back here as the model ``--quantization fp8`` makes from SRC (the same codes and scales), and
(ii) the compressed-tensors library decompresses, module by module, to the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from test_fp8_formats import _lib

from mixtral.checkpoint.loader import load_model
from mixtral.cli.main import main
from mixtral.model.quantized import quant_weights


def test_convert_fp8_loads_back_and_decompresses_in_the_library(tiny_hf_checkpoint: Path, tmp_path: Path,
                                                               capsys) -> None:
    dst = tmp_path / "fp8"
    assert main(["convert", str(tiny_hf_checkpoint), str(dst), "--to", "hf", "--quantization", "fp8",
                 "--dtype", "bf16", "--no-progress"]) == 0
    config = json.loads((dst / "config.json").read_text())
    block = config["quantization_config"]
    assert block["quant_method"] == "compressed-tensors" and block["format"] == "float-quantized"
    # (i) the same model as quantizing while loading
    written = dict(quant_weights(load_model(str(dst), "cpu", torch.float32)))
    direct = dict(quant_weights(load_model(str(tiny_hf_checkpoint), "cpu", torch.float32, quantization="fp8")))
    assert written.keys() == direct.keys() and len(written) == 8
    for path, qw in written.items():
        assert torch.equal(qw.tensors["weight"].view(torch.uint8), direct[path].tensors["weight"].view(torch.uint8))
        assert torch.equal(qw.tensors["weight_scale"], direct[path].tensors["weight_scale"])
    # (ii) the library reads the config and decompresses every module to our dequantized weights
    scheme = _lib().QuantizationConfig.model_validate(block).config_groups["group_0"]
    tensors = load_file(str(dst / "model.safetensors"))
    full = load_model(str(tiny_hf_checkpoint), "cpu", torch.float32)
    checked = 0
    for name, t in tensors.items():
        if not name.endswith(".weight_scale"):
            continue
        module = name.removesuffix(".weight_scale")
        local = {"weight": tensors[f"{module}.weight"], "weight_scale": t}
        lib = _lib().COMPRESSOR.decompress(local, scheme)["weight"].float()
        assert torch.equal(lib, local["weight"].float() * t.float()), module
        checked += 1
    assert checked == full.args.n_layers * (4 + 3 * full.args.num_experts)
    assert tensors["model.layers.0.block_sparse_moe.gate.weight"].dtype == torch.bfloat16  # routers stay float
    assert tensors["lm_head.weight"].dtype == torch.bfloat16

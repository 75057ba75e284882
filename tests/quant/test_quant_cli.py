"""The quantization surfaces: ``--quantization`` on every command that loads a model (with --help that
explains it), ``mixtral info --quantization`` (bytes per part, KV room and longest context on an 80 GB GPU),
the pre-load memory check counting quantized bytes, ``--lora`` refused on quantized weights."""

from __future__ import annotations

import json

import pytest
import torch

from mixtral.cli.main import build_parser, main
from mixtral.cli.serve import load_engine
from mixtral.engine.loading import load_for_engine
from mixtral.engine.memory import InsufficientMemoryError


@pytest.mark.parametrize("command", [["serve"], ["generate", "x"], ["chat"], ["bench", "throughput"],
                                     ["bench", "gpu"], ["info", "tiny"]])
def test_every_loading_command_takes_quantization(command: list[str], capsys) -> None:
    args = build_parser(command[0]).parse_args([*command, "--quantization", "int4"])
    assert args.quantization == "int4"
    with pytest.raises(SystemExit):
        build_parser(command[0]).parse_args([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--quantization" in text and "W4A16" in text and "per token" in text
    with pytest.raises(SystemExit):
        build_parser(command[0]).parse_args([*command, "--quantization", "int3"])


def test_info_prints_bytes_per_part_and_the_longest_context(capsys) -> None:
    assert main(["info", "mixtral-8x22b", "--quantization", "int4", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["memory_plan"]
    parts = plan["weight_bytes"]
    assert plan["scheme"] == "int4" and 67 * 2**30 < parts["total"] < 70 * 2**30  # 8x22B in int4: fits an H100
    vocab = 32000  # Mixtral-8x22B's base vocabulary
    assert parts["experts"] > 0.9 * parts["total"] and parts["embeddings"] == parts["lm_head"] == vocab * 6144 * 2
    room = int(plan["gpu_bytes"] * 0.9) - parts["total"]
    assert plan["kv_room_bytes"] == room and plan["max_context_tokens"]["bf16"] == room // (56 * 2 * 8 * 128 * 2)
    assert main(["info", "mixtral-8x7b", "-q", "fp8", "--gpu-memory-utilization", "0.95"]) == 0
    out = capsys.readouterr().out
    assert "weights as loaded (fp8)" in out and "longest context" in out and "experts" in out
    assert main(["info", "mixtral-8x22b"]) == 0  # bf16: 262 GiB cannot fit one GPU
    assert "the weights do not fit" in capsys.readouterr().out


def test_memory_check_counts_quantized_bytes() -> None:
    from mixtral.checkpoint.quant_load import flag_spec, model_methods
    from mixtral.model.footprint import weight_bytes
    from mixtral.model.presets import preset

    args = preset("tiny")
    fp32 = weight_bytes(args, torch.float32)["total"]
    int4 = weight_bytes(args, torch.float32, model_methods(args, flag_spec("int4", args)))["total"]
    assert int4 < fp32
    probe = lambda device: ((fp32 + int4) // 2, "test memory")  # noqa: E731 (too small for fp32, not for int4)
    with pytest.raises(InsufficientMemoryError, match="float32 weights"):
        load_for_engine("tiny", "cpu", "float32", memory_probe=probe, max_model_len=16)
    model, _, _ = load_for_engine("tiny", "cpu", "float32", memory_probe=probe, max_model_len=16,
                                  quantization="int4")
    assert model.layers[0].feed_forward.quantized
    with pytest.raises(InsufficientMemoryError, match="int8 weights"):
        load_for_engine("tiny", "cpu", "float32", memory_probe=lambda d: (2**20, "1 MiB"), quantization="int8")


def test_lora_with_quantization_is_refused(tmp_path) -> None:
    args = build_parser("serve").parse_args(["serve", "tiny", "--lora", str(tmp_path), "--quantization", "fp8",
                                             "--device", "cpu"])
    with pytest.raises(ValueError, match="--lora merges an adapter into bf16 weights"):
        load_engine(args)


def test_quantization_of_a_built_model_is_refused() -> None:
    from mixtral.checkpoint.loader import load_model

    with pytest.raises(ValueError, match="already built"):
        load_for_engine(load_model("tiny"), quantization="fp8")
    assert torch.is_tensor(load_model("tiny", quantization="fp8").layers[0].attention.wqkv.weight)

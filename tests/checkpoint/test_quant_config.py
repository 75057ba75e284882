"""quantization_config parsing: the configs the real libraries write become the right QuantSpec, and every
unsupported one fails with the field and value named."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mixtral.checkpoint.quant_config import (
    QuantConfigError,
    is_quantized,
    parse_quantization_config,
    quantized_params,
    read_quant_config,
    resolve_quant_spec,
    spec_from_flag,
)
from mixtral.model.presets import preset


# compressed-tensors imports triton: imported at collection it would come before tests/kernels' conftest turns
# Triton's interpreter on, and the interpreted kernel tests of a whole-suite run would break.
def QuantizationConfig():
    from compressed_tensors.quantization import QuantizationConfig as cls

    return cls


def preset_name_to_scheme(name: str, targets: list[str]):
    from compressed_tensors.quantization import preset_name_to_scheme as fn

    return fn(name, targets)


def _ct(scheme: str, ignore: list[str], fmt: str, **extra) -> dict:
    """A compressed-tensors config block as llm-compressor writes it, built through the library itself."""
    group = preset_name_to_scheme(scheme, ["Linear"]).model_dump()
    block = {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
             "config_groups": {"group_0": group}, "ignore": ignore, **extra}
    QuantizationConfig().model_validate(block)  # the library accepts what the test feeds the parser
    return json.loads(json.dumps(block, default=str))


RH_IGNORE = ["lm_head", "re:.*block_sparse_moe.gate"]


def test_compressed_tensors_fp8_static_per_tensor() -> None:
    # RedHatAI/Mixtral-8x7B-Instruct-v0.1-FP8: per-tensor weight and static per-tensor input scales.
    spec = parse_quantization_config(_ct("FP8", RH_IGNORE, "float-quantized"))
    assert (spec.method, spec.source, spec.checkpoint_format) == ("fp8", "compressed-tensors", "float-quantized")
    assert spec.weight_per_tensor and spec.static_input_scale and not spec.kv_cache_scales
    assert spec.targets == ("Linear",) and spec.ignore == tuple(RH_IGNORE)


def test_compressed_tensors_fp8_dynamic_per_channel_with_kv_scheme() -> None:
    kv = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
    spec = parse_quantization_config(_ct("FP8_DYNAMIC", RH_IGNORE, "float-quantized", kv_cache_scheme=kv))
    assert spec.method == "fp8" and not spec.weight_per_tensor and not spec.static_input_scale
    assert spec.kv_cache_scales


@pytest.mark.parametrize(("scheme", "method", "group", "sym"), [
    ("W4A16", "int4", 128, True), ("W4A16_ASYM", "int4", 128, False), ("W8A16", "int8", 128, True)])
def test_compressed_tensors_pack_quantized(scheme: str, method: str, group: int, sym: bool) -> None:
    spec = parse_quantization_config(_ct(scheme, ["lm_head"], "pack-quantized"))
    assert (spec.method, spec.group_size, spec.symmetric, spec.checkpoint_format) == (
        method, group, sym, "pack-quantized")


def test_compressed_tensors_preset_group_and_per_group_format() -> None:
    block = {"quant_method": "compressed-tensors", "format": "mixed-precision",
             "config_groups": {"group_0": {**preset_name_to_scheme("W4A16", ["Linear"]).model_dump(),
                                           "format": "pack-quantized"}}}
    assert parse_quantization_config(json.loads(json.dumps(block, default=str))).checkpoint_format == "pack-quantized"
    preset_block = {"quant_method": "compressed-tensors", "format": "float-quantized",
                    "config_groups": {"FP8_DYNAMIC": ["Linear"]}}
    QuantizationConfig().model_validate(preset_block)
    assert parse_quantization_config(preset_block).method == "fp8"


def test_autofp8() -> None:
    block = {"quant_method": "fp8", "activation_scheme": "static",
             "ignored_layers": ["lm_head", "model.layers.0.block_sparse_moe.gate"], "kv_cache_scheme": "static"}
    spec = parse_quantization_config(block)
    assert (spec.method, spec.source) == ("fp8", "autofp8")
    assert spec.static_input_scale and spec.weight_per_tensor and spec.kv_cache_scales
    assert not is_quantized(spec, "model.layers.0.block_sparse_moe.gate")
    assert is_quantized(spec, "model.layers.1.block_sparse_moe.gate")  # AutoFP8 names exact modules
    dyn = parse_quantization_config({"quant_method": "fp8", "activation_scheme": "dynamic"})
    assert not dyn.static_input_scale


def test_awq_and_gptq() -> None:
    awq = parse_quantization_config({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
                                     "version": "gemm", "modules_to_not_convert": ["gate"]})
    assert (awq.method, awq.source, awq.group_size, awq.symmetric) == ("int4", "awq", 128, False)
    assert not is_quantized(awq, "model.layers.3.block_sparse_moe.gate")
    assert is_quantized(awq, "model.layers.3.block_sparse_moe.experts.7.w2")
    assert not is_quantized(awq, "lm_head")
    old_awq = parse_quantization_config({"quant_method": "awq", "w_bit": 4, "q_group_size": 64, "zero_point": False})
    assert (old_awq.group_size, old_awq.symmetric) == (64, True)
    gptq = parse_quantization_config({"quant_method": "gptq", "bits": 8, "group_size": -1, "desc_act": True,
                                      "sym": True, "damp_percent": 0.1})
    assert (gptq.method, gptq.group_size, gptq.act_order, gptq.checkpoint_format) == ("int8", 0, False, "gptq")
    g4 = parse_quantization_config({"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True,
                                    "sym": False, "checkpoint_format": "gptq_v2"})
    assert (g4.method, g4.group_size, g4.act_order, g4.symmetric, g4.checkpoint_format) == (
        "int4", 32, True, False, "gptq_v2")
    assert is_quantized(g4, "model.layers.0.self_attn.o_proj")
    assert not is_quantized(g4, "model.layers.0.block_sparse_moe.gate")


@pytest.mark.parametrize(("block", "field", "value"), [
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "bits", "3"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 96}, "group_size", "96"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "lm_head": True}, "lm_head", "True"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method", "'bitsandbytes'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "version", "'gemv'"),
    ({"quant_method": "awq", "bits": 8, "group_size": 128}, "bits", "8"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
     "weight_block_size", "[128, 128]"),
    ({"quant_method": "fp8", "activation_scheme": "weird"}, "activation_scheme", "'weird'"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {}},
     "config_groups", "{}"),
])
def test_unsupported_configs_name_field_and_value(block: dict, field: str, value: str) -> None:
    with pytest.raises(QuantConfigError, match=rf"quantization_config\.{field} = {re.escape(value)}") as info:
        parse_quantization_config(block, "x/config.json")
    assert "x/config.json" in str(info.value)


def test_unsupported_compressed_tensors_schemes() -> None:
    with pytest.raises(QuantConfigError, match=r"group_0\.input_activations .*W8A8"):
        parse_quantization_config(_ct("W8A8", [], "int-quantized"))
    with pytest.raises(QuantConfigError, match=r"group_0\.weights\.strategy = 'block'"):
        parse_quantization_config(_ct("FP8_BLOCK", [], "float-quantized"))
    grouped = _ct("W4A16", [], "pack-quantized")
    grouped["config_groups"]["group_0"]["weights"]["group_size"] = 48
    with pytest.raises(QuantConfigError, match=r"group_0\.weights\.group_size = 48"):
        parse_quantization_config(grouped)
    mixed = _ct("W4A16", [], "pack-quantized")
    mixed["config_groups"]["group_1"] = {**preset_name_to_scheme("W8A16", ["re:.*self_attn.*"]).model_dump()}
    with pytest.raises(QuantConfigError, match=r"config_groups = \['group_0', 'group_1'\].*mixed precision"):
        parse_quantization_config(json.loads(json.dumps(mixed, default=str)))
    with pytest.raises(QuantConfigError, match=r"format = 'pack-quantized'"):
        parse_quantization_config(_ct("FP8_DYNAMIC", [], "pack-quantized"))
    with pytest.raises(QuantConfigError, match=r"sparsity_config"):
        parse_quantization_config(_ct("FP8_DYNAMIC", [], "float-quantized",
                                      sparsity_config={"format": "sparse-24-bitmask"}))


def test_quantized_params_follow_targets_and_ignore() -> None:
    args = preset("tiny")
    spec = parse_quantization_config(_ct("FP8_DYNAMIC", RH_IGNORE, "float-quantized"))
    plan = quantized_params(spec, args)
    assert plan["layers.0.attention.wqkv.weight"] and plan["layers.1.feed_forward.w13"]
    assert not plan["layers.0.feed_forward.gate.weight"] and not plan["output.weight"]
    # Experts only: attention stays bf16 in the checkpoint.
    experts_only = _ct("FP8_DYNAMIC", ["lm_head"], "float-quantized")
    experts_only["config_groups"]["group_0"]["targets"] = [r"re:.*block_sparse_moe\.experts.*"]
    plan = quantized_params(parse_quantization_config(experts_only), args)
    assert not plan["layers.0.attention.wqkv.weight"] and plan["layers.0.feed_forward.w2"]
    assert not plan["layers.0.feed_forward.gate.weight"]
    # A quantized router gate is reported, so the loader can dequantize it into the bf16 gate.
    assert quantized_params(parse_quantization_config(_ct("FP8", ["lm_head"], "float-quantized")), args)[
        "layers.0.feed_forward.gate.weight"]


def test_half_quantized_fused_tensor_is_refused() -> None:
    block = _ct("FP8_DYNAMIC", ["lm_head", "re:.*gate", "model.layers.0.self_attn.k_proj"], "float-quantized")
    with pytest.raises(QuantConfigError, match=r"q_proj but not model\.layers\.0\.self_attn\.k_proj.*wqkv"):
        quantized_params(parse_quantization_config(block), preset("tiny"))


def test_group_size_must_divide_the_model() -> None:
    spec = parse_quantization_config({"quant_method": "gptq", "bits": 4, "group_size": 128})
    args = preset("tiny")
    if args.dim % 128 == 0 and args.hidden_dim % 128 == 0:
        args = args.replace(hidden_dim=96)
    with pytest.raises(QuantConfigError, match="group_size 128 does not divide"):
        quantized_params(spec, args)


def test_flag_and_checkpoint_reconcile(tmp_path: Path) -> None:
    assert spec_from_flag("fp8").source == "bf16"
    with pytest.raises(QuantConfigError, match="--quantization 'int3'"):
        spec_from_flag("int3")
    fp8_cfg = {"quantization_config": _ct("FP8", RH_IGNORE, "float-quantized")}
    assert resolve_quant_spec(None, {}) is None
    assert resolve_quant_spec("fp8", {}).source == "bf16"
    assert resolve_quant_spec("fp8", fp8_cfg).source == "compressed-tensors"
    assert resolve_quant_spec("compressed-tensors", fp8_cfg).method == "fp8"
    with pytest.raises(QuantConfigError, match="--quantization 'int4' does not match"):
        resolve_quant_spec("int4", fp8_cfg)
    # Older exports keep the config beside config.json.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    assert read_quant_config(tmp_path) is None
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 128, "desc_act": False}))
    block, where = read_quant_config(tmp_path)
    assert parse_quantization_config(block, where).source == "gptq" and where.endswith("quantize_config.json")

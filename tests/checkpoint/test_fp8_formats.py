"""FP8 checkpoints made by the compressed-tensors library (tensor and channel strategies, static and dynamic
inputs) and in AutoFP8's layout load into the fp8 method's canonical tensors, whose dequantization equals the
library's own decompression; what ``convert`` writes decompresses in the library to the same weights and
loads back unchanged."""

from __future__ import annotations

import functools
import json
from types import SimpleNamespace

import pytest
import torch

from mixtral.checkpoint import fp8_formats as ff
from mixtral.checkpoint.hf import hf_specs
from mixtral.checkpoint.quant_config import parse_quantization_config, quantized_params
from mixtral.checkpoint.specs import TensorSpec
from mixtral.model.presets import preset
from mixtral.quant.fp8 import FP8, Fp8Method

ARGS = preset("tiny-odd").replace(n_layers=2, vocab_size=64)
IGNORE = ["lm_head", "re:.*block_sparse_moe.gate"]


@functools.cache
def _lib() -> SimpleNamespace:
    """compressed-tensors, imported on first use: it imports triton, and at collection that would come before
    tests/kernels' conftest turns Triton's interpreter on (the interpreted kernel tests of a whole-suite run
    would break)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams

    return SimpleNamespace(COMPRESSOR=BaseCompressor.get_value_from_registry("float-quantized"),
                           QuantizationConfig=QuantizationConfig, preset_name_to_scheme=preset_name_to_scheme,
                           calculate_qparams=calculate_qparams)


def _ct_block(preset_name: str) -> dict:
    block = {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
             "config_groups": {"group_0": _lib().preset_name_to_scheme(preset_name, ["Linear"]).model_dump()},
             "ignore": IGNORE}
    return json.loads(json.dumps(block, default=str))


def _compress(w: torch.Tensor, scheme, input_scale: float) -> dict[str, torch.Tensor]:
    """One module's tensors as llm-compressor saves them: min-max scales from the library, then its compressor."""
    wf = w.float()
    if scheme.weights.strategy == "channel":
        lo, hi = wf.amin(dim=1, keepdim=True), wf.amax(dim=1, keepdim=True)
    else:
        lo, hi = wf.amin().reshape(1), wf.amax().reshape(1)
    scale, zero = _lib().calculate_qparams(lo, hi, scheme.weights)
    state = {"weight": w, "weight_scale": scale, "weight_zero_point": zero}
    if scheme.input_activations is not None and not scheme.input_activations.dynamic:
        state["input_scale"] = torch.tensor([input_scale])
    return _lib().COMPRESSOR.compress(state, scheme)


def _linear_specs() -> list[TensorSpec]:
    return [s for s in hf_specs(ARGS) if s.name.endswith("_proj.weight") or ".experts." in s.name]


def _checkpoint(preset_name: str, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict, object]:
    """Every linear of a 2-layer model compressed by the library (the router gates left bf16, as ignored)."""
    gen = torch.Generator().manual_seed(seed)
    scheme = _lib().preset_name_to_scheme(preset_name, ["Linear"])
    tensors: dict[str, torch.Tensor] = {}
    for i, spec in enumerate(_linear_specs()):
        w = (torch.randn(spec.shape, generator=gen) * (0.5 + i % 5)).to(torch.bfloat16)
        module = ff.module_name(spec)
        tensors.update({f"{module}.{k}": v for k, v in _compress(w, scheme, 0.01 * (1 + i % 7)).items()})
    return tensors, _ct_block(preset_name), scheme


def _load(tensors: dict[str, torch.Tensor], block: dict) -> tuple[dict[str, dict], object]:
    """The loader's job for the quantized parameters: validate headers, allocate canonical, fill piece by piece."""
    qspec = parse_quantization_config(block)
    plan = quantized_params(qspec, ARGS)
    info = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    canon: dict[str, dict] = {}
    for spec in _linear_specs():
        assert plan[spec.param]
        assert ff.check_entries(spec, qspec, info) == []
        if spec.param not in canon:
            lead = (ARGS.num_experts,) if spec.index and isinstance(spec.index[0], int) else ()
            shape = {"wqkv": (ARGS.q_size + 2 * ARGS.kv_size, ARGS.dim), "wo": (ARGS.dim, ARGS.q_size),
                     "w13": (2 * ARGS.hidden_dim, ARGS.dim), "w2": (ARGS.dim, ARGS.hidden_dim)}[
                spec.param.split(".")[-2 if spec.param.endswith(".weight") else -1]]
            canon[spec.param] = ff.empty_canonical(lead, *shape, qspec.static_input_scale)
        ff.load_piece(spec, qspec, tensors.__getitem__, canon[spec.param])
    return canon, qspec


@pytest.mark.parametrize("preset_name", ["FP8", "FP8_DYNAMIC"])
def test_loaded_pieces_dequantize_like_the_library(preset_name: str) -> None:
    tensors, block, scheme = _checkpoint(preset_name)
    canon, qspec = _load(tensors, block)
    method = Fp8Method(qspec)
    for spec in _linear_specs():
        module = ff.module_name(spec)
        local = {k.removeprefix(module + "."): v for k, v in tensors.items() if k.startswith(module + ".")}
        want = _lib().COMPRESSOR.decompress(local, scheme)["weight"].float()
        got = spec.select(method.dequantize(canon[spec.param], torch.float32))
        assert torch.equal(got, want), spec.name


def test_static_input_scales_merge_by_maximum() -> None:
    tensors, block, _ = _checkpoint("FP8")
    canon, qspec = _load(tensors, block)
    assert qspec.static_input_scale and qspec.weight_per_tensor
    attn = "model.layers.1.self_attn"
    want = max(tensors[f"{attn}.{p}_proj.input_scale"].item() for p in "qkv")
    assert canon["layers.1.attention.wqkv.weight"]["input_scale"].item() == want
    experts = "model.layers.0.block_sparse_moe.experts"
    for e in range(ARGS.num_experts):
        want = max(tensors[f"{experts}.{e}.{w}.input_scale"].item() for w in ("w1", "w3"))
        assert canon["layers.0.feed_forward.w13"]["input_scale"][e].item() == want
    # w1 and w3 of one expert keep their own per-tensor weight scales, broadcast over their rows.
    scales = canon["layers.0.feed_forward.w13"]["weight_scale"][2]  # [2F]
    f = ARGS.hidden_dim
    assert torch.all(scales[:f] == tensors[f"{experts}.2.w1.weight_scale"].item())
    assert torch.all(scales[f:] == tensors[f"{experts}.2.w3.weight_scale"].item())
    # process_after_loading keeps one input scale per parameter: the largest.
    processed = Fp8Method(qspec).process_after_loading(canon["layers.0.feed_forward.w13"])
    assert processed["input_scale"].item() == canon["layers.0.feed_forward.w13"]["input_scale"].max().item()


def test_autofp8_layout() -> None:
    """AutoFP8 writes one scalar ([]) weight and input scale per linear."""
    gen = torch.Generator().manual_seed(3)
    tensors = {}
    for spec in _linear_specs():
        w = torch.randn(spec.shape, generator=gen)
        scale = w.abs().max() / 448
        module = ff.module_name(spec)
        tensors[spec.name] = (w / scale).to(FP8)
        tensors[f"{module}.weight_scale"] = scale.reshape(())
        tensors[f"{module}.input_scale"] = torch.tensor(0.02)
    block = {"quant_method": "fp8", "activation_scheme": "static",
             "ignored_layers": ["lm_head"] + [f"model.layers.{i}.block_sparse_moe.gate" for i in range(2)]}
    canon, qspec = _load(tensors, block)
    for spec in _linear_specs():
        module = ff.module_name(spec)
        want = tensors[spec.name].float() * tensors[f"{module}.weight_scale"]
        assert torch.equal(spec.select(Fp8Method(qspec).dequantize(canon[spec.param], torch.float32)), want)


def test_header_problems_are_named() -> None:
    tensors, block, _ = _checkpoint("FP8_DYNAMIC")
    qspec = parse_quantization_config(block)
    spec = next(s for s in _linear_specs() if s.name.endswith("q_proj.weight"))
    module = ff.module_name(spec)
    info = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    info[f"{module}.weight_scale"] = (torch.float32, (1,))  # per-tensor where the config says per-channel
    info[spec.name] = (torch.bfloat16, spec.shape)  # not FP8
    problems = ff.check_entries(spec, qspec, info)
    assert any(f"{module}.weight_scale" in p and "[1]" in p and f"[{spec.shape[0]}, 1]" in p for p in problems)
    assert any(spec.name in p and "float8_e4m3fn" in p for p in problems)
    del info[f"{module}.weight_scale"]
    assert any("missing" in p for p in ff.check_entries(spec, qspec, info))


def test_a_quantized_router_gate_is_dequantized() -> None:
    scheme = _lib().preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    spec = next(s for s in hf_specs(ARGS) if s.name.endswith("block_sparse_moe.gate.weight"))
    local = _compress(torch.randn(spec.shape).to(torch.bfloat16), scheme, 0.0)
    module = ff.module_name(spec)
    tensors = {f"{module}.{k}": v for k, v in local.items()}
    got = ff.dequantize_piece(spec, parse_quantization_config(_ct_block("FP8_DYNAMIC")), tensors.__getitem__,
                              torch.float32)
    assert torch.equal(got, _lib().COMPRESSOR.decompress(local, scheme)["weight"].float())


def test_written_checkpoint_decompresses_in_the_library_and_loads_back() -> None:
    block = ff.quantization_config_block()
    config = _lib().QuantizationConfig.model_validate(block)  # the library reads the config we write
    scheme = config.config_groups["group_0"]
    assert scheme.weights.strategy == "channel" and scheme.input_activations.dynamic
    gen = torch.Generator().manual_seed(5)
    method = Fp8Method()
    canon = {}
    for spec in _linear_specs():
        if spec.param not in canon:
            shape = {"wqkv.weight": (ARGS.q_size + 2 * ARGS.kv_size, ARGS.dim), "wo.weight": (ARGS.dim, ARGS.q_size),
                     "w13": (ARGS.num_experts, 2 * ARGS.hidden_dim, ARGS.dim),
                     "w2": (ARGS.num_experts, ARGS.dim, ARGS.hidden_dim)}
            key = next(k for k in shape if spec.param.endswith(k))
            canon[spec.param] = method.quantize(torch.randn(shape[key], generator=gen))
    written: dict[str, torch.Tensor] = {}
    for spec in _linear_specs():
        pieces = ff.piece_tensors(spec, canon[spec.param])
        assert [(n, tuple(t.shape), t.dtype) for n, t in pieces.items()] == ff.write_entries(spec)
        module = ff.module_name(spec)
        local = {k.removeprefix(module + "."): v for k, v in pieces.items()}
        want = spec.select(method.dequantize(canon[spec.param], torch.float32))
        assert torch.equal(_lib().COMPRESSOR.decompress(local, scheme)["weight"].float(), want), spec.name
        written.update(pieces)
    loaded, qspec = _load(written, block)
    assert (qspec.method, qspec.weight_per_tensor, qspec.static_input_scale) == ("fp8", False, False)
    for param, t in canon.items():
        assert torch.equal(loaded[param]["weight"].view(torch.uint8), t["weight"].view(torch.uint8))
        assert torch.equal(loaded[param]["weight_scale"], t["weight_scale"])


def test_kv_scale_names() -> None:
    ct = parse_quantization_config(_ct_block("FP8"))
    assert ff.kv_scale_names(3, ct) == ("model.layers.3.self_attn.k_scale", "model.layers.3.self_attn.v_scale")
    auto = parse_quantization_config({"quant_method": "fp8", "activation_scheme": "static"})
    assert ff.kv_scale_names(0, auto)[1] == "model.layers.0.self_attn.v_proj.output_scale"

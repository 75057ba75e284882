"""Pre-quantized checkpoints in every supported layout load through ``load_model`` into the quantized model:
its weights dequantize to the format library's own weights (exactly), and its logits equal the fp32 model built
from those weights (weight-only int schemes: to fp32 rounding; FP8, whose activations are quantized per token
too: within that rounding's bound). Bad or conflicting configs fail before anything is allocated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from quant_ckpt_testing import ARGS, FORMATS, float_model, write_quantized

from mixtral.checkpoint.errors import CheckpointError
from mixtral.checkpoint.hf import hf_specs
from mixtral.checkpoint.loader import load_model
from mixtral.checkpoint.quant_config import QuantConfigError
from mixtral.kernels.config import KernelConfig
from mixtral.kernels.reference import route_topk
from mixtral.model.quantized import QuantLinear, quant_weights
from mixtral.quant.int_cpu import cpu_moe
from mixtral.quant.int_method import reference_moe

IDS = torch.randint(0, ARGS.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_checkpoint_loads_as_the_library_dequantizes_it(fmt: str, tmp_path: Path) -> None:
    expected = write_quantized(tmp_path / fmt, fmt)
    model = load_model(str(tmp_path / fmt), "cpu", torch.float32, kernels=KernelConfig(backend="reference"))
    ref = float_model(ARGS, expected)
    qweights = dict(quant_weights(model))
    assert len(qweights) == 4 * ARGS.n_layers  # wqkv, wo, w13, w2 of every layer; router, embeddings, lm_head float
    assert model.output.weight.dtype == model.layers[0].feed_forward.gate.weight.dtype == torch.float32
    # Every piece's dequantization is the library's weight bit for bit.
    for spec in hf_specs(ARGS):
        path = spec.param.removesuffix(".weight")
        if path in qweights:
            lib = expected[spec.name]
            mine = spec.select(qweights[path].method.dequantize(qweights[path].tensors, lib.dtype))
            assert torch.equal(mine, lib), spec.name
    with torch.no_grad():
        got, want = model(IDS), ref(IDS)
    if fmt.startswith(("ct-fp8", "autofp8")):
        # FP8 multiplies activation codes too (per token, or the static scale): e4m3 keeps 3 mantissa bits, and
        # this tiny random model's two layers compound it; the weights themselves were checked exactly above.
        assert _rel(got, want) < 0.2
    else:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # The default (auto) kernels on CPU: the PyTorch path, the same weights.
    auto = load_model(str(tmp_path / fmt), "cpu", torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(auto(IDS), got, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel", ["packed", pytest.param("native", marks=pytest.mark.native_cpu)])
def test_bf16_activations_through_the_cpu_packed_path(tmp_path: Path, kernel: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A GPTQ int4 checkpoint in bf16: the CPU packed matmuls (or the native integer-dot kernel) against the bf16
    reference backend; the load says which kernel the weights got."""
    write_quantized(tmp_path / "g", "gptq-4bit-act-order-g32")
    with caplog.at_level("INFO", logger="mixtral.model.quantized"):
        fast = load_model(str(tmp_path / "g"), "cpu", torch.bfloat16, kernels=KernelConfig(cpu_int_kernel=kernel))
    assert f"int weights on CPU: 8 {kernel}" in caplog.text
    ref = load_model(str(tmp_path / "g"), "cpu", torch.bfloat16, kernels=KernelConfig(backend="reference"))
    key = "cpu_n4" if kernel == "native" else "cpu_q4"
    assert all(key in qw.tensors for _, qw in quant_weights(fast))
    with torch.no_grad():
        if kernel == "packed":
            assert _rel(fast(IDS).float(), ref(IDS).float()) < 0.02
            return
        # int8 activations (~0.5% a product) flip some of this tiny random model's routing choices, which moves
        # its logits by more than any bound worth asserting: each weight is held to the reference on its own input.
        inputs: dict[str, torch.Tensor] = {}
        ref_linears = {n: m for n, m in quant_weights(ref) if isinstance(m, QuantLinear)}
        hooks = [m.register_forward_hook(lambda _m, inp, _o, n=n: inputs.__setitem__(n, inp[0]))
                 for n, m in ref_linears.items()]
        ref(IDS)
        for h in hooks:
            h.remove()
        fast_modules = dict(quant_weights(fast))
        assert len(inputs) == 4  # wqkv, wo of both layers
        for name, x in inputs.items():
            assert _rel(fast_modules[name](x).float(), ref_linears[name](x).float()) < 0.015, name
        for layer in range(ARGS.n_layers):
            f13, f2 = (fast_modules[f"layers.{layer}.feed_forward.{w}"].tensors for w in ("w13", "w2"))
            r13, r2 = (dict(quant_weights(ref))[f"layers.{layer}.feed_forward.{w}"].tensors for w in ("w13", "w2"))
            g = torch.Generator().manual_seed(layer)
            x = torch.randn(18, ARGS.dim, generator=g).bfloat16()
            weights, ids = route_topk(torch.randn(18, ARGS.num_experts, generator=g), 2)
            got, want = cpu_moe(x, f13, f2, weights, ids), reference_moe(x, r13, r2, weights, ids)
            assert _rel(got.float(), want.float()) < 0.03  # two products, the second's input rounded too


def test_flag_conflicting_with_the_checkpoint_fails_naming_both(tmp_path: Path) -> None:
    write_quantized(tmp_path / "fp8", "ct-fp8-channel-dynamic")
    with pytest.raises(QuantConfigError, match=r"--quantization 'int4'.*compressed-tensors fp8"):
        load_model(str(tmp_path / "fp8"), quantization="int4")
    # vLLM's spelling of the format, or the scheme itself, is accepted
    assert len(dict(quant_weights(load_model(str(tmp_path / "fp8"), quantization="fp8")))) == 8


def test_unsupported_config_fails_before_allocating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_quantized(tmp_path / "g", "gptq-8bit-g64-sym")
    config = json.loads((tmp_path / "g" / "config.json").read_text())
    config["quantization_config"]["bits"] = 3
    (tmp_path / "g" / "config.json").write_text(json.dumps(config))
    from mixtral.checkpoint import loader

    def no_alloc(*args: object, **kwargs: object) -> None:
        raise AssertionError("allocated before refusing")

    monkeypatch.setattr(loader, "empty_model", no_alloc)
    with pytest.raises(QuantConfigError, match=r"quantization_config.bits = 3"):
        load_model(str(tmp_path / "g"))
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static",
                                     "weight_block_size": [128, 128]}
    (tmp_path / "g" / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantConfigError, match=r"weight_block_size = \[128, 128\]"):
        load_model(str(tmp_path / "g"))


def test_missing_scale_is_named_before_allocating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file, save_file

    write_quantized(tmp_path / "a", "awq-g64")
    path = tmp_path / "a" / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.scales"]
    save_file(tensors, str(path))
    from mixtral.checkpoint import loader

    monkeypatch.setattr(loader, "empty_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("allocated")))
    with pytest.raises(CheckpointError, match=r"experts\.3\.w2\.scales' is missing"):
        load_model(str(tmp_path / "a"))

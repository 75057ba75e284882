"""A tiny quantized model under ``KernelConfig(backend="triton")`` on CPU (Triton's interpreter: the FP8 and
int Triton kernels behind ``Kernels.quant_linear`` / ``quant_moe``) gives the reference backend's logits.

fp32 activations (the interpreter's bf16 dot is wrong, conftest.py): the kernels and the reference compute the
same codes and products, summed in another order."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixtral.checkpoint.loader import load_model
from mixtral.checkpoint.writer import save_checkpoint
from mixtral.kernels.config import KernelConfig
from mixtral.model.args import ModelArgs
from mixtral.model.mixtral import Transformer, init_random_weights
from mixtral.model.quantized import quant_weights

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=256,
                 num_experts=4, num_experts_per_tok=2, max_seq_len=128)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = Transformer(ARGS)
    init_random_weights(model, seed=7, std=0.1)
    return save_checkpoint(model, ARGS, tmp_path_factory.mktemp("qtriton"), "hf")


@pytest.mark.parametrize("scheme", ["fp8", "int8", "int4"])
def test_triton_backend_equals_reference(scheme: str, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    from mixtral.quant.base import QuantMethod

    for entry in ("triton_linear", "triton_moe", "reference_linear", "reference_moe"):
        cls = type(next(quant_weights(load_model(str(folder), quantization=scheme)))[1].method)
        original = getattr(cls, entry)

        def spy(self: QuantMethod, *a: object, _o=original, _e=entry, **k: object) -> torch.Tensor:
            calls.append(_e)
            return _o(self, *a, **k)

        monkeypatch.setattr(cls, entry, spy)
    ids = torch.randint(0, ARGS.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    ref = load_model(str(folder), "cpu", torch.float32, quantization=scheme,
                     kernels=KernelConfig(backend="reference"))
    fast = load_model(str(folder), "cpu", torch.float32, quantization=scheme, kernels=KernelConfig(backend="triton"))
    with torch.no_grad():
        want = ref(ids)
        assert set(calls) == {"reference_linear", "reference_moe"}
        calls.clear()
        got = fast(ids)
        assert set(calls) == {"triton_linear", "triton_moe"}  # the kernels ran, not the reference
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

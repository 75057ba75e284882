"""The decode-size GEMM kernel (kernels/triton/skinny_gemm.py) against a float64 product, on CPU through the
interpreter (fp32 and fp16; the interpreter's bf16 dot is unreliable), and its dispatch in ``Kernels.linear``."""

from __future__ import annotations

import pytest
import torch

from mixtral.kernels.config import KernelConfig
from mixtral.kernels.dispatch import Kernels
from mixtral.kernels.triton import skinny_gemm as sg


@pytest.mark.parametrize(("m", "n", "k", "config"), [
    (1, 40, 64, None), (3, 100, 300, None),  # K not a multiple of the tile: masked tail
    (16, 33, 512, (16, 128, 4, 3)), (5, 64, 256, (64, 64, 4, 2)),
    (2, 16, 32, (16, 64, 4, 2)),  # K shorter than one tile: only the first (masked) tile
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_skinny_gemm_matches_float64(m: int, n: int, k: int, config: tuple[int, int, int, int] | None,
                                     dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) * k**-0.5).to(dtype)
    out = sg.skinny_gemm(x, w, config)
    want = (x.double() @ w.double().T).to(dtype)
    assert out.shape == (m, n) and out.dtype == dtype
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-3, "atol": 2e-3}
    torch.testing.assert_close(out, want, **tol)


def test_skinny_gemm_strided_input_and_bad_shapes() -> None:
    x = torch.randn(4, 2, 64)[:, 1]  # [4, 64] with row stride 128
    w = torch.randn(24, 64)
    torch.testing.assert_close(sg.skinny_gemm(x, w), x @ w.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        sg.skinny_gemm(torch.randn(17, 64), w)
    with pytest.raises(ValueError, match="do not fit"):
        sg.skinny_gemm(torch.randn(2, 63), w)


def test_linear_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = sg.skinny_gemm
    monkeypatch.setattr(sg, "skinny_gemm", lambda *a, **kw: calls.append(a[0].shape) or original(*a, **kw))
    kernels = Kernels(KernelConfig(backend="triton"))  # the interpreted kernel on CPU tensors
    w = torch.randn(32, 64).half()
    kernels.linear(torch.randn(2, 64).half(), w)  # decode size, 2-byte dtype: the kernel
    kernels.linear(torch.randn(17, 64).half(), w)  # too many rows: F.linear
    kernels.linear(torch.randn(2, 64), w.float())  # fp32 stays on F.linear (exactness checks run in fp32)
    kernels.linear(torch.randn(2, 64).half(), w.clone().requires_grad_())  # autograd: F.linear
    assert calls == [torch.Size([2, 64])]
    Kernels(KernelConfig()).linear(torch.randn(2, 64).half(), w)  # auto backend, CPU tensor: F.linear
    assert calls == [torch.Size([2, 64])]

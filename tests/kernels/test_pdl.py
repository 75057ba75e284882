"""When kernels launch with programmatic dependent launch (kernels/triton/pdl.py): only compiled kernels on
sm90+ CUDA devices, with a Triton that has griddepcontrol, unless MIXTRAL_PDL=0. The launches themselves are
checked on the GPU (tests/gpu/test_gpu_pdl.py) and by compile_check (tests/kernels/test_compile_check.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mixtral.kernels.triton import pdl


@pytest.fixture
def cuda_tensor(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """Stands in for a tensor on CUDA device 0, which reports compute capability ``arch`` (default sm90)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("MIXTRAL_PDL", raising=False)
    t = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), arch=90)
    monkeypatch.setattr(pdl, "_device_supports", lambda index: t.arch >= 90)
    monkeypatch.setattr(pdl, "HAS_GDC", True)
    return t


def test_on_for_hopper(cuda_tensor: SimpleNamespace) -> None:
    assert pdl.pdl_args(cuda_tensor) == {"PDL": True, "launch_pdl": True}  # type: ignore[arg-type]


@pytest.mark.parametrize("why", ["cpu", "sm80", "interpreter", "env", "old triton"])
def test_off(cuda_tensor: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, why: str) -> None:
    t: object = cuda_tensor
    if why == "cpu":
        t = torch.zeros(1)
    elif why == "sm80":
        cuda_tensor.arch = 80
    elif why == "interpreter":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    elif why == "env":
        monkeypatch.setenv("MIXTRAL_PDL", "0")
    else:
        monkeypatch.setattr(pdl, "HAS_GDC", False)
    # Off: no launch_pdl keyword at all, so a Triton without the option never sees it.
    assert pdl.pdl_args(t) == {"PDL": False}  # type: ignore[arg-type]

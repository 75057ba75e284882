"""When kernels launch with programmatic dependent launch (kernels/triton/pdl.py): only compiled kernels on
sm90+ CUDA devices, with a Triton that has griddepcontrol, unless the caller turns it off (``KernelConfig.pdl``,
which the dispatch hands each kernel). The launches themselves are checked on the GPU (tests/gpu/test_gpu_pdl.py)
and by compile_check (tests/kernels/test_compile_check.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mixtral.kernels.triton import pdl


@pytest.fixture
def cuda_tensor(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """Stands in for a tensor on CUDA device 0, which reports compute capability ``arch`` (default sm90)."""
    monkeypatch.setattr(pdl, "INTERPRET", False)  # read once at import; the kernel tests import interpreted
    t = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), arch=90)
    monkeypatch.setattr(pdl, "_device_supports", lambda index: t.arch >= 90)
    monkeypatch.setattr(pdl, "HAS_GDC", True)
    return t


def test_on_for_hopper(cuda_tensor: SimpleNamespace) -> None:
    assert pdl.pdl_args(cuda_tensor) == {"PDL": True, "launch_pdl": True}  # type: ignore[arg-type]


@pytest.mark.parametrize("why", ["cpu", "sm80", "interpreter", "config", "old triton"])
def test_off(cuda_tensor: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, why: str) -> None:
    t: object = cuda_tensor
    enabled = True
    if why == "cpu":
        t = torch.zeros(1)
    elif why == "sm80":
        cuda_tensor.arch = 80
    elif why == "interpreter":
        monkeypatch.setattr(pdl, "INTERPRET", True)
    elif why == "config":
        enabled = False
    else:
        monkeypatch.setattr(pdl, "HAS_GDC", False)
    # Off: no launch_pdl keyword at all, so a Triton without the option never sees it.
    assert pdl.pdl_args(t, enabled) == {"PDL": False}  # type: ignore[arg-type]


def test_interpreter_is_read_at_import() -> None:
    """The kernel tests import the kernel modules with TRITON_INTERPRET=1 (conftest.py): PDL sees it once."""
    assert pdl.INTERPRET is True

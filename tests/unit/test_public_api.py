"""The names ``mixtral`` exports are the real classes, imported on first use (``import mixtral`` stays cheap)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import mixtral
from mixtral.kernels.config import KernelConfig


def test_kernel_config_is_exported() -> None:
    from mixtral import KernelConfig as exported

    assert exported is KernelConfig and "KernelConfig" in mixtral.__all__
    assert exported(pdl=False) == KernelConfig(pdl=False)
    with pytest.raises(ValueError, match="backend='cuda' is not one of"):
        exported(backend="cuda")


def test_every_exported_name_resolves() -> None:
    for name in mixtral.__all__:
        assert getattr(mixtral, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        mixtral.Nope  # noqa: B018


def test_import_mixtral_loads_no_torch() -> None:
    """The lazy table keeps ``import mixtral`` from importing torch (a CLI's --help starts fast)."""
    code = "import sys, mixtral; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]

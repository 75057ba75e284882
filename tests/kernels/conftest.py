"""Run the Triton kernels on CPU through Triton's interpreter (TRITON_INTERPRET=1), confined to these tests.

Triton reads TRITON_INTERPRET when a kernel is decorated (module import) and again lazily while launching,
so the kernel modules are (re)imported with it set, and an autouse fixture sets it for each test here
only; other test folders never see it. Note: the interpreter's bf16 ``tl.dot`` is wrong (Triton 3.9: it
returns garbage even for a plain 16x16 product), so CPU tests use fp32 and fp16; bf16 is checked on the GPU
by tests/gpu (``python -m pytest -m gpu``).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator

import pytest

KERNEL_MODULES = [
    "mixtral.kernels.triton.pdl",  # first: the kernels below call its pdl_enter
    "mixtral.kernels.triton.fp8_quant", "mixtral.kernels.triton.fp8_kv",  # FP8 helpers write_kv and rope call
    "mixtral.kernels.triton.moe_configs",
    "mixtral.kernels.triton.moe_align",
    "mixtral.kernels.triton.moe_sum",
    "mixtral.kernels.triton.moe_glue",
    "mixtral.kernels.triton.fused_moe",
    "mixtral.kernels.triton.int_dequant", "mixtral.kernels.triton.int_linear", "mixtral.kernels.triton.int_moe",
    "mixtral.kernels.triton.write_kv",
    "mixtral.kernels.triton.attention_tile",
    "mixtral.kernels.triton.paged_decode",
    "mixtral.kernels.triton.paged_attention",
    "mixtral.kernels.triton.rmsnorm", "mixtral.kernels.triton.rope", "mixtral.kernels.triton.router",
    "mixtral.kernels.triton.gate_router",
    "mixtral.kernels.triton.skinny_gemm",
    "mixtral.kernels.triton.persistent_moe",
    "mixtral.kernels.triton.sorted_moe",
    "mixtral.kernels.triton.fp8_gemm", "mixtral.kernels.triton.fp8_fused_moe",
    "mixtral.kernels.triton.fp8_sorted_moe", "mixtral.kernels.triton.fp8_moe",
]


def _import_interpreted() -> None:
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        for name in KERNEL_MODULES:
            if name in sys.modules:
                importlib.reload(sys.modules[name])
            else:
                importlib.import_module(name)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


_import_interpreted()


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Keep the interpreter on while a kernel test runs (Triton imports parts of itself lazily)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield

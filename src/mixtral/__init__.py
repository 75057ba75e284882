"""mixtral: self-hosted inference and serving for Mistral's Mixtral-8x7B and Mixtral-8x22B.

Public API (imported lazily so ``import mixtral`` stays cheap):
``load_model``, ``LLM``, ``SamplingParams``, ``ModelArgs``, ``KernelConfig`` (which implementation runs each
fused op: ``LLM(..., kernels=KernelConfig(...))``), ``RequestOutput``, ``CompletionOutput``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ModelArgs": "mixtral.model.args",
    "load_model": "mixtral.checkpoint.loader",
    "LLM": "mixtral.llm",
    "SamplingParams": "mixtral.sampling",
    "KernelConfig": "mixtral.kernels.config",
    "RequestOutput": "mixtral.engine.outputs",
    "CompletionOutput": "mixtral.engine.outputs",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mixtral' has no attribute {name!r}")

"""Weight quantization: one method object per scheme (see quant/base.py for the seam).

``get_method(spec)`` builds the method a validated :class:`QuantSpec` names; the schemes live in their own
modules and are imported only when asked for.
"""

from __future__ import annotations

import importlib

from mixtral.quant.base import QuantMethod, QuantSpec, QuantTensors, StoredTensor

# scheme -> "module:class"; imported on first use so a bf16 run never imports a quantization module.
METHODS: dict[str, str] = {
    "fp8": "mixtral.quant.fp8:Fp8Method",
    "int8": "mixtral.quant.int8:Int8Method",
    "int4": "mixtral.quant.int4:Int4Method",
}


def get_method(spec: QuantSpec) -> QuantMethod:
    """The method object for ``spec.method``; a ValueError lists the schemes there are."""
    if spec.method not in METHODS:
        raise ValueError(f"unknown quantization {spec.method!r}; choose from {', '.join(sorted(METHODS))}")
    module, cls = METHODS[spec.method].split(":")
    return getattr(importlib.import_module(module), cls)(spec)


__all__ = ["METHODS", "QuantMethod", "QuantSpec", "QuantTensors", "StoredTensor", "get_method"]

"""W4A16: 4-bit integer weights with group scales (default group 128), bf16/fp16 activations.

Symmetric (``(c - 8) * s``) or with zero points (``(c - z) * s``), or GGUF's float offsets (``c * s + o``);
GPTQ act-order as a stored column permutation. The layout and its proof of exactness: quant/int_layout.py.
The matmuls and dispatch: quant/int_method.py.
"""

from __future__ import annotations

from mixtral.quant.int_method import IntMethod


class Int4Method(IntMethod):
    """``QuantSpec(method="int4", ...)``; ``Int4Method(spec, fmt)`` takes an explicit 4-bit IntFormat."""

    name = "int4"
    bits = 4

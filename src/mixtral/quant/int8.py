"""W8A16: 8-bit integer weights, one scale per output channel by default (group scales for GGUF Q8_0/Q6_K,
GPTQ 8-bit), bf16/fp16 activations.

Codes are int8 (sources with unsigned 8-bit codes are shifted by 128, zero points with them). The layout
and its proof of exactness: quant/int_layout.py. The matmuls and dispatch: quant/int_method.py.
"""

from __future__ import annotations

from mixtral.quant.int_method import IntMethod


class Int8Method(IntMethod):
    """``QuantSpec(method="int8", ...)``; ``Int8Method(spec, fmt)`` takes an explicit 8-bit IntFormat."""

    name = "int8"
    bits = 8

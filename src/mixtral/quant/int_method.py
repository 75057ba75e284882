"""The integer weight-only schemes' method object (W4A16 / W8A16): storage, creation, reference and dispatch.

``Int4Method`` (quant/int4.py) and ``Int8Method`` (quant/int8.py) are this class with their bit width. The
method's own :class:`IntFormat` decides what it allocates (``stored``) and makes (``quantize``); ``linear``,
``moe`` and ``dequantize`` read each weight's format from its tensors instead, so the two weights of one MoE
layer may differ (a GGUF Q4_K_M file has Q4_K gate/up experts and Q6_K down experts in some layers).

The paths (kernels/dispatch.py chooses among them from the model's KernelConfig):
- ``triton_*``: the Triton kernels (kernels/triton/int_linear.py, int_moe.py) on the canonical layout;
- ``torch_*``: on CPU, PyTorch's packed CPU matmuls on the layout ``process_after_loading`` made
  (quant/int_cpu.py), else (and on other devices) the reference;
- ``reference_*`` (anywhere): dequantize in the activation dtype, then matmul (kernels/reference.py for the
  MoE). Weights repacked for the CPU matmuls have no canonical tensors left: the loader keeps the canonical
  layout when the backend is ``reference`` (``act_dtype=None``).

Not here: reading checkpoint formats (checkpoint/awq.py, gptq.py, ct_packed.py, gguf_file.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixtral.kernels.reference import moe_reference
from mixtral.quant.base import QuantMethod, QuantSpec, QuantTensors, StoredTensor
from mixtral.quant.int_cpu import cpu_linear, cpu_moe, prepare_cpu
from mixtral.quant.int_layout import IntFormat, dequantize, quantize_rtn

DEFAULT_INT4_GROUP = 128  # ``--quantization int4`` of a bf16 checkpoint
SOURCES = ("bf16", "awq", "gptq", "compressed-tensors", "gguf")


def default_format(spec: QuantSpec, bits: int) -> IntFormat:
    """The format a spec asks for: its group size (a bf16 source quantized to int4 here defaults to
    ``DEFAULT_INT4_GROUP``; int8 to one scale per channel), symmetric or integer zero points, its scale dtype
    (default fp16: the dtype AWQ and GPTQ files use, with 3 more mantissa bits than bf16)."""
    if spec.source not in SOURCES:
        raise ValueError(f"int{bits} weights cannot come from {spec.source!r}; sources: {', '.join(SOURCES)}")
    group = spec.group_size
    if spec.source == "bf16" and bits == 4 and group == 0:
        group = DEFAULT_INT4_GROUP
    return IntFormat(bits, group, spec.scale_dtype or torch.float16, "none" if spec.symmetric else "int",
                     spec.act_order)


def int4_group_for(widths: tuple[int, ...], want: int = DEFAULT_INT4_GROUP) -> int:
    """The group size ``--quantization int4`` uses for a model whose linears have these input widths (dim,
    hidden_dim, q_size): ``want`` when it divides them all, else the largest of 64, 32, 16 that does (the demo
    model, dim 192 and hidden 320, gets 64). Raises when none does."""
    for g in (want, 64, 32, 16):
        if g <= want and all(w % g == 0 for w in widths):
            return g
    raise ValueError(f"no int4 group size of 16 to {want} divides the input widths {widths}")


def drop_identity_perm(t: QuantTensors) -> QuantTensors:
    """Act-order weights whose permutation is the identity (a GPTQ layer without desc_act in an act-order
    checkpoint) lose it, so kernels take the plain path."""
    perm = t.get("perm")
    if perm is None:
        return t
    ident = torch.arange(perm.shape[-1], device=perm.device, dtype=perm.dtype).expand_as(perm)
    return {k: v for k, v in t.items() if k != "perm"} if torch.equal(perm, ident) else t


class IntMethod(QuantMethod):
    """Integer codes + group scales (+ zero points or offsets): see quant/int_layout.py for the layout."""

    bits = 0

    def __init__(self, spec: QuantSpec, fmt: IntFormat | None = None) -> None:
        if spec.method != self.name:
            raise ValueError(f"{type(self).__name__} got a spec for {spec.method!r}")
        self.spec = spec
        self.format = fmt or default_format(spec, self.bits)
        if self.format.bits != self.bits:
            raise ValueError(f"{self.name} method given a {self.format.bits}-bit format")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.format})"

    # ----------------------------------------------------------------- storage and creation
    def stored(self) -> list[StoredTensor]:
        return self.format.stored()

    def quantize(self, w: torch.Tensor) -> QuantTensors:
        return quantize_rtn(w, self.format)

    def dequantize(self, t: QuantTensors, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(t, dtype)

    def process_after_loading(self, t: QuantTensors, act_dtype: torch.dtype | None = None,
                              cpu_kernel: str = "auto") -> QuantTensors:
        """Drops an identity act-order permutation; on CPU repacks for the CPU matmuls (int_cpu.py, ``cpu_kernel``
        choosing the layout) when ``act_dtype`` is bf16/fp16. CUDA kernels read the canonical layout as it is."""
        t = drop_identity_perm(t)
        if t["qweight"].device.type == "cpu":
            return prepare_cpu(t, act_dtype, cpu_kernel)
        return t

    # ----------------------------------------------------------------- matmuls
    def reference_linear(self, x: torch.Tensor, t: QuantTensors) -> torch.Tensor:
        return reference_linear(x, _canonical(t))

    def reference_moe(self, x: torch.Tensor, w13: QuantTensors, w2: QuantTensors, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor, expert_start: int = 0) -> torch.Tensor:
        return reference_moe(x, _canonical(w13), _canonical(w2), topk_weights, topk_ids, expert_start)

    def torch_linear(self, x: torch.Tensor, t: QuantTensors) -> torch.Tensor:
        if x.device.type == "cpu":
            return cpu_linear(x, t)
        return self.reference_linear(x, t)

    def torch_moe(self, x: torch.Tensor, w13: QuantTensors, w2: QuantTensors, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, expert_start: int = 0) -> torch.Tensor:
        if x.device.type == "cpu":
            return cpu_moe(x, w13, w2, topk_weights, topk_ids, expert_start)
        return self.reference_moe(x, w13, w2, topk_weights, topk_ids, expert_start)

    def triton_linear(self, x: torch.Tensor, t: QuantTensors, pdl: bool = True) -> torch.Tensor:
        from mixtral.kernels.triton.int_linear import int_linear

        return int_linear(x, _canonical(t), pdl=pdl)

    def triton_moe(self, x: torch.Tensor, w13: QuantTensors, w2: QuantTensors, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, expert_start: int = 0, pdl: bool = True) -> torch.Tensor:
        from mixtral.kernels.triton.int_moe import int_fused_moe

        return int_fused_moe(x, _canonical(w13), _canonical(w2), topk_weights, topk_ids, expert_start, pdl=pdl)


def _canonical(t: QuantTensors) -> QuantTensors:
    """``t`` itself when it is in the canonical layout; a clear error when it was repacked for the CPU matmuls
    (the reference and the Triton kernels read only the canonical layout)."""
    if "qweight" not in t:
        raise ValueError("these int weights were repacked for PyTorch's CPU matmuls when they were loaded, so only "
                         "the CPU path can multiply them; load the model with KernelConfig(backend='reference') "
                         "(--kernel-backend reference) to keep the canonical layout")
    return t


def reference_linear(x: torch.Tensor, t: QuantTensors) -> torch.Tensor:
    """The reference every fast path is held to: dequantize in x's dtype, then ``F.linear``."""
    return F.linear(x, dequantize(t, x.dtype))


def reference_moe(x: torch.Tensor, w13: QuantTensors, w2: QuantTensors, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, expert_start: int = 0) -> torch.Tensor:
    return moe_reference(x, dequantize(w13, x.dtype), dequantize(w2, x.dtype), topk_weights, topk_ids, expert_start)


def method_for_format(fmt: IntFormat, source: str = "gguf") -> IntMethod:
    """The int method that stores ``fmt`` (readers whose formats vary per tensor, as GGUF, build theirs here)."""
    from mixtral.quant.int4 import Int4Method
    from mixtral.quant.int8 import Int8Method

    cls = Int4Method if fmt.bits == 4 else Int8Method
    spec = QuantSpec(cls.name, source, fmt.group_size, fmt.zero == "none", fmt.act_order, scale_dtype=fmt.scale_dtype)
    return cls(spec, fmt)

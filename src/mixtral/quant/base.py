"""The quantization seam: one ``QuantMethod`` object per scheme; layers call the method, never branch on it.

A quantized weight is a logical matrix ``[*lead, out, in]`` (``lead`` is ``(E,)`` for a MoE layer's experts,
``()`` for a dense projection) kept as a few stored tensors (codes, scales, zero points, ...). Each stored
tensor is described by a :class:`StoredTensor`: its name, dtype, and how its trailing axes relate to the
logical ``out`` and ``in`` axes. That description is what lets one loader fill any scheme piece by piece
(the q/k/v rows of ``wqkv``, the w1/w3 rows of an expert's ``w13``) and lets tensor parallelism slice any
scheme: logical rows ``[a, b)`` are stored rows ``[a // out_block, b // out_block)``, logical columns
``[c, d)`` are stored columns ``[c // in_block, d // in_block)``.

Worked example, int4 with group size 128 on a logical [4096, 14336] weight (w2 of 8x7B, per expert):
``codes`` uint8 [4096, 7168] (out_block 1, in_block 2: two 4-bit codes a byte), ``scales`` [4096, 112]
(out_block 1, in_block 128); its column slice [7168, 14336) (TP rank 1 of 2) is codes[:, 3584:7168] and
scales[:, 56:112].

The stored ("canonical") layout is the one loading and slicing see. ``process_after_loading`` may then
repack into whatever layout the kernels read (e.g. transposed or interleaved); after it only the multiplying
entry points touch the tensors.

Each method offers its multiplications three ways, and never chooses among them itself:
``reference_linear`` / ``reference_moe`` (the ground truth, anywhere), ``torch_linear`` / ``torch_moe`` (the
PyTorch fast path where Triton does not run, e.g. CPU packed matmuls; default: the reference) and
``triton_linear`` / ``triton_moe`` (the GPU kernels, given the config's ``pdl``; None where the scheme has none).
The choice is the model's ``Kernels`` (kernels/dispatch.py ``quant_linear`` / ``quant_moe``), from its
``KernelConfig``; ``linear`` / ``moe`` here are conveniences that ask a ``Kernels`` (the default one unless
given).

What is not here: reading checkpoint formats (checkpoint/ maps each format's tensors onto the canonical
ones) and the choice of kernel (kernels/dispatch.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mixtral.kernels.dispatch import Kernels

QuantTensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StoredTensor:
    """One stored tensor of a quantized weight. Its shape for a logical ``[*lead, out, in]`` weight is
    ``[*lead, out // out_block]`` followed by ``[in // in_block]`` when ``in_block`` is not 0.

    - ``out_block``: logical output rows per stored row (1: one per output channel). 0: no out axis either
      (a per-tensor value, shape ``[*lead]``; such a tensor is replicated, never sliced).
    - ``in_block``: logical input columns per stored column (1 plain, 2 two int4 codes a byte, the group
      size for group scales). 0: no in axis (a per-output-channel scale ``[*lead, out]``).
    - ``in_only``: a per-input-column vector ``[*lead, in // in_block]`` with no out axis (GPTQ act-order's
      input permutation, quant/int_layout.py): sliced by columns, never by rows.
    """

    name: str
    dtype: torch.dtype
    out_block: int = 1
    in_block: int = 1
    in_only: bool = False

    def shape(self, lead: tuple[int, ...], out_features: int, in_features: int) -> tuple[int, ...]:
        if self.in_only:
            return (*lead, in_features // self.in_block)
        if self.out_block == 0:
            return lead
        rows = (*lead, out_features // self.out_block)
        return rows if self.in_block == 0 else (*rows, in_features // self.in_block)

    def rows(self, t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The view of ``t`` holding logical output rows [start, stop) (``t`` itself when it has no out axis)."""
        if self.out_block == 0 or self.in_only:
            return t
        axis = t.dim() - (1 if self.in_block == 0 else 2)
        return t.narrow(axis, start // self.out_block, (stop - start) // self.out_block)

    def cols(self, t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The view of ``t`` holding logical input columns [start, stop) (``t`` itself when it has no in axis)."""
        if self.in_only:
            return t.narrow(t.dim() - 1, start // self.in_block, (stop - start) // self.in_block)
        if self.out_block == 0 or self.in_block == 0:
            return t
        return t.narrow(t.dim() - 1, start // self.in_block, (stop - start) // self.in_block)


@dataclass(frozen=True)
class QuantSpec:
    """What a checkpoint's ``quantization_config`` (or a ``--quantization`` flag) asks for, validated.

    - ``method``: the scheme the weights end up in here: "fp8", "int8" or "int4".
    - ``source``: where the codes come from: "bf16" (quantized here while loading), "compressed-tensors",
      "autofp8", "awq", "gptq" or "gguf".
    - ``group_size``: input columns per scale (int schemes; 0 = one scale per output channel).
    - ``symmetric``: no zero points.
    - ``act_order``: GPTQ's ``desc_act`` (groups are given per input column by ``g_idx``).
    - ``static_input_scale``: FP8 checkpoints that carry ``input_scale`` (activations quantized with it
      instead of per token).
    - ``ignore``: checkpoint module names (or ``re:`` patterns, matched with ``re.match``) kept unquantized.
    - ``targets``: checkpoint module names, ``re:`` patterns or the class name ``"Linear"`` (every linear)
      that the checkpoint quantized; ``ignore`` wins over ``targets``.
    - ``checkpoint_format``: the source's own layout tag, where it has one: compressed-tensors' ``format``
      ("float-quantized", "pack-quantized", "naive-quantized", "int-quantized"), AWQ's ``version``
      ("gemm"), GPTQ's ``checkpoint_format`` ("gptq": zero points stored minus one, or "gptq_v2").
    - ``weight_per_tensor``: the checkpoint holds one weight scale per tensor (compressed-tensors strategy
      "tensor", AutoFP8); the loader broadcasts it to the canonical per-channel scales.
    - ``kv_cache_scales``: the checkpoint carries per-layer FP8 KV-cache scales (compressed-tensors
      ``kv_cache_scheme``; AutoFP8 ``kv_cache_scheme: "static"``).
    - ``scale_dtype``: the dtype scales are kept in (int schemes: the checkpoint's, so loading is exact; None =
      the scheme's default).
    """

    method: str
    source: str = "bf16"
    group_size: int = 0
    symmetric: bool = True
    act_order: bool = False
    static_input_scale: bool = False
    ignore: tuple[str, ...] = field(default_factory=tuple)
    targets: tuple[str, ...] = ("Linear",)
    checkpoint_format: str = ""
    weight_per_tensor: bool = False
    kv_cache_scales: bool = False
    scale_dtype: torch.dtype | None = None


class QuantMethod(ABC):
    """How one scheme stores, creates, restores and multiplies weights.

    The reference path (``reference_linear`` / ``reference_moe``) runs anywhere, CPU included, and is what every
    kernel is held to. Which path runs is decided by kernels/dispatch.py, never here (module docstring).
    """

    name: str = ""

    @abstractmethod
    def stored(self) -> list[StoredTensor]:
        """The stored tensors of one weight, in a fixed order (the model registers them as buffers)."""

    @abstractmethod
    def quantize(self, w: torch.Tensor) -> QuantTensors:
        """w [*lead, out, in] (bf16/fp16/fp32) -> the stored tensors (round to nearest). Rows are quantized
        independently, so quantizing a block of rows equals slicing the quantized whole."""

    @abstractmethod
    def dequantize(self, t: QuantTensors, dtype: torch.dtype) -> torch.Tensor:
        """The stored tensors -> the logical weight [*lead, out, in] in ``dtype`` (the reference)."""

    def process_after_loading(self, t: QuantTensors, act_dtype: torch.dtype | None = None,
                              cpu_kernel: str = "auto") -> QuantTensors:
        """Repack the loaded canonical tensors for the kernels (once, on the target device). ``act_dtype`` is the
        model's activation dtype when known (CPU packed matmuls take their scales in it); None keeps the
        canonical layout (the reference backend reads it). ``cpu_kernel``: KernelConfig.cpu_int_kernel (which CPU
        layout integer weights get). Default: as is."""
        return t

    # ----------------------------------------------------------------- the multiplications, by path
    @abstractmethod
    def reference_linear(self, x: torch.Tensor, t: QuantTensors) -> torch.Tensor:
        """x [M, in] -> [M, out] in x's dtype (a dense projection): the reference computation."""

    @abstractmethod
    def reference_moe(self, x: torch.Tensor, w13: QuantTensors, w2: QuantTensors, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor, expert_start: int = 0) -> torch.Tensor:
        """The experts of a MoE layer: x [N, D], w13 logical [E, 2F, D], w2 logical [E, D, F], topk_weights
        [N, k] fp32, topk_ids [N, k] global ids -> [N, D] in x's dtype (experts outside
        [expert_start, expert_start + E) contribute nothing: another rank holds them). The reference."""

    def torch_linear(self, x: torch.Tensor, t: QuantTensors) -> torch.Tensor:
        """``reference_linear``'s contract on the PyTorch fast path (where Triton does not run)."""
        return self.reference_linear(x, t)

    def torch_moe(self, x: torch.Tensor, w13: QuantTensors, w2: QuantTensors, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, expert_start: int = 0) -> torch.Tensor:
        """``reference_moe``'s contract on the PyTorch fast path."""
        return self.reference_moe(x, w13, w2, topk_weights, topk_ids, expert_start)

    # Triton entry points: same contracts plus ``pdl`` (KernelConfig.pdl); None when the scheme has no kernels.
    triton_linear: Callable[..., torch.Tensor] | None = None
    triton_moe: Callable[..., torch.Tensor] | None = None

    # ----------------------------------------------------------------- conveniences (dispatch decides)
    def linear(self, x: torch.Tensor, t: QuantTensors, kernels: Kernels | None = None) -> torch.Tensor:
        """``reference_linear``'s contract through ``kernels`` (default: ``KernelConfig()``'s dispatch)."""
        from mixtral.kernels.dispatch import default_kernels

        return (kernels or default_kernels()).quant_linear(self, x, t)

    def moe(self, x: torch.Tensor, w13: QuantTensors, w2: QuantTensors, topk_weights: torch.Tensor,
            topk_ids: torch.Tensor, expert_start: int = 0, kernels: Kernels | None = None) -> torch.Tensor:
        """``reference_moe``'s contract through ``kernels`` (default: ``KernelConfig()``'s dispatch)."""
        from mixtral.kernels.dispatch import default_kernels

        return (kernels or default_kernels()).quant_moe(self, x, w13, w2, topk_weights, topk_ids, expert_start)

    def weight_bytes(self, lead: tuple[int, ...], out_features: int, in_features: int) -> int:
        """Bytes one weight takes in the canonical layout (memory planning, ``mixtral info``)."""
        total = 0
        for s in self.stored():
            n = 1
            for d in s.shape(lead, out_features, in_features):
                n *= d
            total += n * torch.empty((), dtype=s.dtype).element_size()
        return total

"""Quantized weights in the model: one module per quantized weight, and the swap that puts them in place.

A :class:`QuantWeight` holds one logical weight ``[*lead, out, in]`` as its scheme's stored tensors, registered
as buffers (shapes from ``StoredTensor.shape``; a state dict therefore carries them), and the ``QuantMethod``
that reads them. Dense projections (``attention.wqkv``, ``attention.wo``) become :class:`QuantLinear`; a MoE
layer's ``w13`` and ``w2`` become :class:`QuantWeight` modules of their own, each with its own method (a GGUF
layer may hold Q4_K gate/up beside Q6_K down). The router gate, embeddings, norms and lm_head stay in the
model dtype. Which kernel multiplies is the model's ``Kernels`` (``quant_linear`` / ``quant_moe``), never
the layer's: a layer only knows whether its weights are quantized (``Attention.quantized``, ``MoE.quantized``).

Lifecycle: ``quantize_modules(model, methods)`` swaps the modules on the meta device (before ``to_empty``), the
loader fills the canonical stored tensors piece by piece (checkpoint/quant_pieces.py), then
``process_quantized(model, act_dtype)`` repacks each weight once for its kernels (``process_after_loading``).
Moving a model keeps each stored tensor's dtype (``.to(dtype)`` changes only the float parameters): a
float8 code or an fp32 scale is never cast.

Not here: the schemes (quant/), the kernel choice (kernels/dispatch.py), reading files (checkpoint/).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn

from mixtral.kernels.config import KernelConfig
from mixtral.kernels.dispatch import Kernels, default_kernels
from mixtral.quant.base import QuantMethod, QuantTensors

logger = logging.getLogger(__name__)

# Internal parameter name (as checkpoint/specs.py names it) -> the module that holds the quantized weight and
# the attribute of its parent it replaces. ``layers.0.attention.wqkv.weight`` -> module
# ``layers.0.attention.wqkv``; ``layers.0.feed_forward.w13`` -> module ``layers.0.feed_forward.w13``.
QUANTIZABLE = ("attention.wqkv.weight", "attention.wo.weight", "feed_forward.w13", "feed_forward.w2")


def module_path(param: str) -> str:
    """The QuantWeight's path for internal parameter ``param`` (one of QUANTIZABLE's)."""
    if not param.endswith(QUANTIZABLE):
        raise ValueError(f"{param!r} is not a quantizable weight (those are {', '.join(QUANTIZABLE)})")
    return param.removesuffix(".weight")


class QuantWeight(nn.Module):
    """One quantized weight: ``method``, the logical shape (``lead``, ``out_features``, ``in_features``) and the
    stored tensors as buffers. ``tensors`` is the name -> tensor dict the method reads (kept in step with the
    buffers, so a call builds nothing)."""

    def __init__(self, method: QuantMethod, lead: tuple[int, ...], out_features: int, in_features: int,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.method = method
        self.lead, self.out_features, self.in_features = tuple(lead), out_features, in_features
        check = getattr(getattr(method, "format", None), "check_shape", None)
        if check is not None:  # int schemes: group sizes and nibble pairs must fit the input width
            check(out_features, in_features)
        for s in method.stored():
            self.register_buffer(s.name, torch.empty(s.shape(self.lead, out_features, in_features), dtype=s.dtype,
                                                     device=device))
        self.kernels: Kernels = default_kernels()
        self.tensors: QuantTensors = dict(self._buffers)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return f"{self.method!r}, lead={self.lead}, out={self.out_features}, in={self.in_features}"

    @property
    def logical_numel(self) -> int:
        n = self.out_features * self.in_features
        for d in self.lead:
            n *= d
        return n

    def set_tensors(self, t: QuantTensors) -> None:
        """Replace the stored tensors (``process_after_loading``'s output may have other names and layouts)."""
        for name in list(self._buffers):
            del self._buffers[name]
        for name, v in t.items():
            self.register_buffer(name, v)
        self.tensors = dict(self._buffers)  # type: ignore[arg-type]

    def process(self, act_dtype: torch.dtype | None, cpu_kernel: str = "auto") -> None:
        """Repack once for the kernels (``QuantMethod.process_after_loading``)."""
        self.set_tensors(self.method.process_after_loading(self.tensors, act_dtype, cpu_kernel))

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantWeight:
        # Keep each stored tensor's dtype: take only the device from what ``fn`` (a .to(), .cuda(), .half(), ...)
        # makes of it. A float8 code or an fp32 scale cast to bf16 would change the weight.
        for name, t in list(self._buffers.items()):
            if t is None:
                continue
            moved = fn(t)
            self._buffers[name] = moved if moved.dtype == t.dtype else t.to(moved.device)
        self.tensors = dict(self._buffers)  # type: ignore[arg-type]
        return self


class QuantLinear(QuantWeight):
    """A quantized dense projection ``[out, in]``: ``forward(x [M, in]) -> [M, out]`` in x's dtype."""

    def __init__(self, method: QuantMethod, out_features: int, in_features: int,
                 device: torch.device | str | None = None) -> None:
        super().__init__(method, (), out_features, in_features, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.quant_linear(self.method, x, self.tensors)


def quantize_modules(model: nn.Module, methods: dict[str, QuantMethod]) -> None:
    """Swap the weights named in ``methods`` (internal parameter names, QUANTIZABLE's) for quantized modules with
    uninitialised stored tensors, on the device the model is on (meta before ``to_empty``). The model's other
    parameters keep their dtype; the layers holding a swapped weight are marked ``quantized``."""
    for param, method in methods.items():
        path = module_path(param)
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        old = getattr(parent, attr)
        device = old.weight.device if isinstance(old, nn.Linear) else old.device
        if isinstance(old, nn.Linear):
            new: QuantWeight = QuantLinear(method, old.out_features, old.in_features, device)
        else:
            *lead, out_features, in_features = old.shape
            new = QuantWeight(method, tuple(lead), out_features, in_features, device)
        new.kernels = getattr(parent, "kernels", default_kernels())
        delattr(parent, attr)  # a Parameter (w13, w2) or a submodule (wqkv, wo)
        setattr(parent, attr, new)
        parent.quantized = True
    _check_moe_pairs(model)


def _check_moe_pairs(model: nn.Module) -> None:
    """A MoE layer's experts are multiplied together: w13 and w2 must both be quantized or both not."""
    for name, module in model.named_modules():
        if hasattr(module, "w13") and hasattr(module, "w2"):
            kinds = {isinstance(module.w13, QuantWeight), isinstance(module.w2, QuantWeight)}
            if len(kinds) > 1:
                raise ValueError(f"{name}: w13 and w2 must both be quantized or both be float, not one of each")


def quant_weights(model: nn.Module) -> Iterator[tuple[str, QuantWeight]]:
    """(path, module) of every quantized weight."""
    for name, module in model.named_modules():
        if isinstance(module, QuantWeight):
            yield name, module


def is_quantized(model: nn.Module) -> bool:
    return next(quant_weights(model), None) is not None


def process_quantized(model: nn.Module, act_dtype: torch.dtype | None, cpu_kernel: str = "auto") -> None:
    """Repack every quantized weight for its kernels, once, after the last piece was loaded (``act_dtype`` None:
    keep the canonical layout, which the reference backend reads; ``cpu_kernel``: KernelConfig.cpu_int_kernel)."""
    layouts: collections.Counter[str] = collections.Counter()
    for _, module in quant_weights(model):
        module.process(act_dtype, cpu_kernel)
        layouts[_cpu_layout(module.tensors)] += 1
    layouts.pop("", None)
    if layouts:  # which CPU kernel the int weights got (the native one, or why not), once per load
        from mixtral.kernels.cpu_native import native_unavailable, native_variant

        if "native" in layouts:
            note = f" (native: the {native_variant()} build)"
        else:  # why native did not run, unless packed was asked for (then nothing is built to find out)
            why = None if cpu_kernel == "packed" else native_unavailable()
            note = f" (native kernel unavailable: {why})" if why else ""
        logger.info("int weights on CPU: %s%s", ", ".join(f"{n} {k}" for k, n in sorted(layouts.items())), note)


def _cpu_layout(t: QuantTensors) -> str:
    """Which CPU kernel a repacked int weight feeds ("" for one not on a CPU or not int)."""
    from mixtral.quant.int_cpu import is_packed
    from mixtral.quant.int_native import native_key

    if native_key(t) is not None:
        return "native"
    if is_packed(t):
        return "packed"
    if "qweight" in t and t["qweight"].device.type == "cpu":
        return "canonical (reference path)"
    return ""


def packed_act_dtype(config: KernelConfig, dtype: torch.dtype) -> torch.dtype | None:
    """The ``act_dtype`` to repack quantized weights for under ``config``: the model dtype where the PyTorch paths
    run (backend ``auto``: CPU packed matmuls where the scheme has them; on CUDA nothing is repacked), None
    where only the canonical layout is read (``reference``, and ``triton``, whose kernels run on CPU too)."""
    return dtype if config.backend == "auto" else None


def quantized_bytes(model: nn.Module) -> int:
    """Bytes the quantized weights' stored tensors take."""
    return sum(t.numel() * t.element_size() for _, m in quant_weights(model) for t in m.tensors.values())


def quant_scheme(model: nn.Module) -> str | None:
    """The scheme name(s) of the model's quantized weights ("fp8", "int4", "int4+int8" for a mixed GGUF), or
    None when it has none."""
    names = sorted({m.method.name for _, m in quant_weights(model)})
    return "+".join(names) if names else None

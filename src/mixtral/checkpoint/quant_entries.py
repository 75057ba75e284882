"""The on-disk tensors of a quantized checkpoint piece, per format: their names, their header checks, and reading
one piece into the canonical stored tensors of its scheme.

One table for every pre-quantized Hugging Face format the loader reads (the names are the producing library's):

==========================  ==============================================================================
source                      tensors of a quantized linear ``{module}``
==========================  ==============================================================================
compressed-tensors FP8,     ``{module}.weight`` F8_E4M3, ``.weight_scale`` (tensor or channel), ``.input_scale``
AutoFP8                     when static (fp8_formats.py)
AWQ (GEMM)                  ``.qweight``, ``.qzeros``, ``.scales`` (awq.py)
GPTQ                        ``.qweight``, ``.qzeros``, ``.scales``, ``.g_idx`` (gptq.py)
compressed-tensors int      ``.weight_packed`` / ``.weight``, ``.weight_scale``, ``.weight_zero_point``,
                            ``.weight_g_idx``, ``.weight_shape`` (ct_packed.py)
==========================  ==============================================================================

Not here: which modules a config quantizes (quant_config.py), the model side (model/quantized.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

import torch

from mixtral.checkpoint import fp8_formats, int_formats
from mixtral.checkpoint.quant_pieces import piece_view, write_piece
from mixtral.checkpoint.specs import IndexEntry, TensorSpec
from mixtral.model.args import ModelArgs
from mixtral.quant.base import QuantSpec, QuantTensors, StoredTensor

Info = Mapping[str, tuple[torch.dtype, tuple[int, ...]]]


def _is_fp8(qspec: QuantSpec) -> bool:
    return qspec.method == "fp8"


def quantized_entry_names(spec: TensorSpec, qspec: QuantSpec) -> list[str]:
    """Every on-disk tensor a quantized piece may have (optional ones included), in reading order."""
    if _is_fp8(qspec):
        return [e.name for e in fp8_formats.fp8_entries(spec, qspec)]
    probe = qspec if qspec.source == "awq" else replace(qspec, act_order=True)  # g_idx may be there either way
    return [name for name, _ in int_formats.piece_entries(spec, probe).values()]


def check_quantized_piece(spec: TensorSpec, qspec: QuantSpec, info: Info) -> list[str]:
    """Problems (missing, mis-shaped, wrong dtype) of one quantized piece's tensors, from the headers alone."""
    if _is_fp8(qspec):
        return fp8_formats.check_entries(spec, qspec, info)
    return int_formats.check_piece(spec, qspec, info)


def extra_names(qspec: QuantSpec, args: ModelArgs) -> list[str]:
    """Tensors a quantized checkpoint may carry beside its pieces: FP8 KV-cache scales where the config announces
    them (read by the FP8 KV-cache path, not by the weight loader)."""
    if not qspec.kv_cache_scales:
        return []
    return [n for layer in range(args.n_layers) for n in fp8_formats.kv_scale_names(layer, qspec)]


def piece_tensors(spec: TensorSpec, qspec: QuantSpec, read: Callable[[str], torch.Tensor]) -> QuantTensors:
    """The canonical stored tensors of quantized piece ``spec`` (an HF linear [out, in]) read through
    ``read(name)``: [out, ...] each; FP8's per-tensor weight scale broadcast to its rows (exact: every row's codes
    were made with it) and its static input scale as one element []."""
    if not _is_fp8(qspec):
        return int_formats.read_piece(spec, qspec, read)
    out_features = spec.shape[0]
    entries = {e.stored: e.name for e in fp8_formats.fp8_entries(spec, qspec)}
    scale = read(entries["weight_scale"]).float().reshape(-1)
    t = {"weight": read(entries["weight"]),
         "weight_scale": scale.expand(out_features).clone() if scale.numel() == 1 else scale}
    if "input_scale" in entries:
        t["input_scale"] = read(entries["input_scale"]).float().reshape(())
    return t


def place_piece(dest: QuantTensors, stored: list[StoredTensor], index: tuple[IndexEntry, ...], n_lead: int,
                piece: QuantTensors) -> None:
    """Copy a piece's stored tensors into its place in the parameter's (``quant_pieces.write_piece``), except a
    static FP8 ``input_scale``, which pieces sharing a parameter merge by maximum (quant/fp8.py: ``dest``'s must
    start at 0)."""
    write_piece(dest, [s for s in stored if s.name != "input_scale"], index, n_lead, piece)
    for s in stored:
        if s.name == "input_scale":
            view = piece_view(dest[s.name], s, index, n_lead)
            view.copy_(torch.maximum(view, piece[s.name].to(view.device).reshape(view.shape)))


def dequantize_quantized_piece(spec: TensorSpec, qspec: QuantSpec, read: Callable[[str], torch.Tensor],
                               dtype: torch.dtype) -> torch.Tensor:
    """A piece the checkpoint quantized but the model keeps in float (a quantized router gate or lm_head)."""
    if _is_fp8(qspec):
        return fp8_formats.dequantize_piece(spec, qspec, read, dtype)
    return int_formats.dequantize_piece(spec, qspec, read, dtype)

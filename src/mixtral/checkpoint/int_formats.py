"""Integer-quantized Hugging Face checkpoints (AWQ, GPTQ, compressed-tensors) -> the int methods' pieces.

The three formats keep HF's module names and split the model the same way (q/k/v, each expert's w1/w3/w2),
so a piece is still an HF :class:`TensorSpec` (checkpoint/hf.py) whose ``{module}.weight`` became a few
tensors. Each format module (awq.py, gptq.py, ct_packed.py) lists those tensors (``entries``) and repacks
them (``to_canonical``); this module checks them from the headers, settles what only the tensors can say,
and reads pieces:

1. ``check_piece(spec, qspec, info)``: every problem of one quantized piece (missing tensor, wrong dtype or
   shape), from the headers alone, so a bad checkpoint fails before anything is allocated;
2. ``refine_spec(qspec, specs, info, read)``: the QuantSpec the method is built from, completed with what the
   config does not say: the scale dtype (the checkpoint's, so loading is exact; fp32, which holds fp16 and
   bf16 exactly, if they differ) and, for GPTQ / compressed-tensors, whether any layer really is act-order
   (reads the small g_idx tensors);
3. ``read_piece(spec, qspec, read)``: the piece's canonical stored tensors [out, ...] in the method's format,
   ready for ``quant_pieces.write_piece``; ``dequantize_piece`` for a quantized linear the model keeps in
   float (a quantized lm_head or router).

Which linears a checkpoint quantizes is quant_config.py's ``quantized_params`` (the fp8 helper's); the caller
passes only quantized pieces here. Not here: the config parsing, the model, the placement.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from types import ModuleType

import torch

from mixtral.checkpoint import awq, ct_packed, gptq
from mixtral.checkpoint.errors import CheckpointError
from mixtral.checkpoint.specs import TensorSpec
from mixtral.quant.base import QuantSpec, QuantTensors
from mixtral.quant.int_layout import dequantize

FORMATS: dict[str, ModuleType] = {"awq": awq, "gptq": gptq, "compressed-tensors": ct_packed}
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT_DTYPES = {"qweight": torch.int32, "qzeros": torch.int32, "g_idx": torch.int32, "weight_packed": torch.int32,
              "weight": torch.int8, "weight_g_idx": torch.int32}
# Header info per tensor name: (dtype, shape).
Info = Mapping[str, tuple[torch.dtype, tuple[int, ...]]]


def _format(qspec: QuantSpec) -> ModuleType:
    if qspec.method not in ("int4", "int8") or qspec.source not in FORMATS:
        raise ValueError(f"no integer checkpoint format for method {qspec.method!r} from {qspec.source!r}; "
                         f"formats: {', '.join(FORMATS)}")
    if qspec.source == "awq" and qspec.symmetric:
        raise CheckpointError("AWQ checkpoints without zero points (zero_point: false) are not supported")
    return FORMATS[qspec.source]


def module_name(spec: TensorSpec) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``model.layers.0.self_attn.q_proj``."""
    if not spec.name.endswith(".weight"):
        raise ValueError(f"{spec.name!r} is not a linear weight")
    return spec.name.removesuffix(".weight")


def piece_entries(spec: TensorSpec, qspec: QuantSpec) -> dict[str, tuple[str, tuple[int, ...]]]:
    """role -> (tensor name, expected shape) of quantized piece ``spec`` (an HF linear [out, in])."""
    out_features, in_features = spec.shape
    return _format(qspec).entries(module_name(spec), out_features, in_features, qspec)


def check_piece(spec: TensorSpec, qspec: QuantSpec, info: Info) -> list[str]:
    """Problems of one quantized piece's tensors, from the headers alone."""
    fmt = _format(qspec)
    in_features = spec.shape[1]
    problems = []
    if qspec.group_size and in_features % qspec.group_size:
        problems.append(f"{module_name(spec)} has {in_features} input columns, not a multiple of the group size "
                        f"{qspec.group_size}")
    for role, (name, shape) in piece_entries(spec, qspec).items():
        if name not in info:
            if role not in getattr(fmt, "OPTIONAL", ()):
                problems.append(f"tensor {name!r} is missing (the quantization config says {module_name(spec)} is "
                                f"{qspec.source} {qspec.method})")
            continue
        dtype, got = info[name]
        want = INT_DTYPES.get(role)
        if role == "weight_shape":
            ok = not dtype.is_floating_point
        elif role == "weight_zero_point":
            ok = dtype in (torch.int32, torch.int8)
        elif want is None:
            ok = dtype in SCALE_DTYPES
        else:
            ok = dtype == want
        if not ok:
            problems.append(f"tensor {name!r} has dtype {dtype}, expected {want or 'fp16, bf16 or fp32'}")
        elif tuple(got) != shape:
            problems.append(f"tensor {name!r} has shape {list(got)}, expected {list(shape)} for "
                            f"{qspec.source} {qspec.method} group {qspec.group_size or 'per channel'}")
    return problems


def refine_spec(qspec: QuantSpec, specs: Iterable[TensorSpec], info: Info,
                read: Callable[[str], torch.Tensor] | None = None) -> QuantSpec:
    """``qspec`` completed from the quantized pieces ``specs``: ``scale_dtype`` and (given ``read``) whether any
    g_idx is really act-order (GPTQ exports often write desc_act=false with contiguous g_idx, or the reverse)."""
    specs = list(specs)
    scale_role = "weight_scale" if qspec.source == "compressed-tensors" else "scales"
    dtypes = {info[piece_entries(s, qspec)[scale_role][0]][0] for s in specs}
    scale_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    act_order = qspec.act_order
    g_role = {"gptq": "g_idx", "compressed-tensors": "weight_g_idx"}.get(qspec.source)
    if read is not None and g_role and qspec.group_size:
        probe = replace(qspec, act_order=True)  # list the g_idx entry even where the config did not
        names = [piece_entries(s, probe)[g_role][0] for s in specs]
        act_order = any(gptq.act_order_perm(read(n), qspec) is not None for n in names if n in info)
    return replace(qspec, scale_dtype=scale_dtype, act_order=act_order)


def read_piece(spec: TensorSpec, qspec: QuantSpec, read: Callable[[str], torch.Tensor]) -> QuantTensors:
    """The canonical stored tensors of quantized piece ``spec`` ([out, ...], scales in ``qspec.scale_dtype``)."""
    fmt = _format(qspec)
    probe = replace(qspec, act_order=True) if qspec.source != "awq" else qspec
    tensors = {}
    for role, (name, _) in piece_entries(spec, probe).items():
        try:
            tensors[role] = read(name)
        except KeyError:
            if role not in getattr(fmt, "OPTIONAL", ()):
                raise
    module = module_name(spec)
    try:
        t = fmt.to_canonical(tensors, qspec, module) if fmt is not awq else fmt.to_canonical(tensors, qspec)
    except ValueError as exc:
        raise CheckpointError(f"{module}: {exc}") from exc
    if qspec.scale_dtype is not None and t["scales"].dtype != qspec.scale_dtype:
        scales = t["scales"].to(qspec.scale_dtype)
        if not torch.equal(scales.to(t["scales"].dtype), t["scales"]):
            raise CheckpointError(f"{module}: scales in {t['scales'].dtype} do not fit {qspec.scale_dtype} exactly")
        t["scales"] = scales
    return t


def dequantize_piece(spec: TensorSpec, qspec: QuantSpec, read: Callable[[str], torch.Tensor],
                     dtype: torch.dtype) -> torch.Tensor:
    """A quantized linear the model keeps in float -> [out, in] in ``dtype`` (the reference dequantization)."""
    return dequantize(read_piece(spec, qspec, read), dtype)

"""compressed-tensors integer checkpoints (``pack-quantized``; 8-bit ``int-quantized`` / ``naive-quantized``)
-> canonical int tensors, exactly.

Per quantized linear ``{module}`` (logical weight [out, in]; llm-compressor's W4A16 / W8A16 output):

- ``weight_packed`` int32 [out, in * bits / 32]: the codes of a row as one little-endian bit stream, code i
  at bits ``i * bits``, each offset to unsigned (``q + 2^(bits-1)``). For 4 bits the bytes of a row are
  exactly the canonical layout (column 2j low nibble, 2j+1 high): the int32 words are reinterpreted, not
  unpacked. 8 bits: byte i is code i, ``(byte ^ 0x80)`` as int8 is q. (int-/naive-quantized: ``weight``
  int8 [out, in] holds q itself.)
- ``weight_scale`` [out, in / g] (group) or [out, 1] (channel), in the model's dtype;
- ``weight_zero_point`` (asymmetric): signed zero points [out, G] packed the same way along the out axis,
  int32 [ceil(out * bits / 32), G] (int-/naive-quantized: int8 [out, G]);
- ``weight_g_idx`` int32 [in] (``actorder: group``): the group of each input column, as GPTQ's g_idx;
- ``weight_shape`` [2] = (out, in).

Value: ``(q - zp) * s`` in the scale dtype (compressed_tensors' dequantize). Canonical 4 bits: codes
``u = q + 8``, zeros ``zp + 8`` (so ``u - z = q - zp``); 8 bits: codes q, zeros zp (int16). Not here: file
reading (int_formats.py) and the config (quant_config.py).
"""

from __future__ import annotations

import sys

import torch

from mixtral.checkpoint.errors import CheckpointError
from mixtral.checkpoint.gptq import act_order_perm, finish_canonical
from mixtral.quant.base import QuantSpec, QuantTensors
from mixtral.quant.int_layout import pack_int4, permute_columns, unpack_int4

Entries = dict[str, tuple[str, tuple[int, ...]]]  # role -> (tensor name, shape)
PACKED = "pack-quantized"


def entries(module: str, out_features: int, in_features: int, qspec: QuantSpec) -> Entries:
    bits = int(qspec.method.removeprefix("int"))
    groups = in_features // qspec.group_size if qspec.group_size else 1
    e: Entries = {"weight_scale": (f"{module}.weight_scale", (out_features, groups))}
    if qspec.checkpoint_format in (PACKED, ""):
        e["weight_packed"] = (f"{module}.weight_packed", (out_features, in_features * bits // 32))
        e["weight_shape"] = (f"{module}.weight_shape", (2,))
        if not qspec.symmetric:
            e["weight_zero_point"] = (f"{module}.weight_zero_point", (-(-out_features * bits // 32), groups))
    else:
        e["weight"] = (f"{module}.weight", (out_features, in_features))
        if not qspec.symmetric:
            e["weight_zero_point"] = (f"{module}.weight_zero_point", (out_features, groups))
    if qspec.act_order:
        e["weight_g_idx"] = (f"{module}.weight_g_idx", (in_features,))
    return e


OPTIONAL = ("weight_g_idx",)


def _bytes(packed: torch.Tensor) -> torch.Tensor:
    """int32 words [R, W] -> their little-endian bytes uint8 [R, 4 W]."""
    if sys.byteorder != "little":
        raise CheckpointError("reading pack-quantized int32 words as bytes needs a little-endian host")
    return packed.contiguous().view(torch.uint8)


def to_canonical(t: dict[str, torch.Tensor], qspec: QuantSpec, module: str = "") -> QuantTensors:
    """One compressed-tensors linear's tensors (by role) -> canonical tensors in the format of ``qspec``."""
    bits = int(qspec.method.removeprefix("int"))
    scales = t["weight_scale"]  # [out, G]
    out_features = scales.shape[0]
    if "weight_shape" in t:
        shape = tuple(int(x) for x in t["weight_shape"].tolist())
        if shape[0] != out_features:
            raise CheckpointError(f"{module}.weight_shape is {list(shape)}, but weight_scale has {out_features} rows")
    if "weight_packed" in t:
        raw = _bytes(t["weight_packed"])  # [out, in * bits / 8]
        u = unpack_int4(raw) if bits == 4 else raw  # unsigned codes q + 2^(bits-1)
    elif bits == 8:
        u = t["weight"].view(torch.uint8) ^ 0x80  # int8 q -> q + 128 as unsigned
    else:
        raise CheckpointError(f"{module}: 4-bit compressed-tensors weights come packed (weight_packed)")
    perm = act_order_perm(t.get("weight_g_idx"), qspec)
    if perm is not None:
        u = permute_columns(u, perm)
    out: QuantTensors = {"qweight": pack_int4(u) if bits == 4 else (u ^ 0x80).view(torch.int8),
                         "scales": scales}
    if not qspec.symmetric:
        zp = t["weight_zero_point"]
        if zp.dtype == torch.int32:  # packed along the out axis: column g's words are a bit stream of rows
            zb = _bytes(zp.T.contiguous())  # [G, bytes]
            zu = (unpack_int4(zb) if bits == 4 else zb)[:, :out_features].T  # [out, G] unsigned zp + 2^(bits-1)
            z = zu.to(torch.int16) - (0 if bits == 4 else 128)
        else:
            z = zp.to(torch.int16) + (8 if bits == 4 else 0)
        out["zeros"] = z.to(torch.uint8 if bits == 4 else torch.int16)
    return finish_canonical(out, qspec, perm, u.shape[-1])

"""GPTQ checkpoints (AutoGPTQ / GPTQModel, 4 and 8 bits, act-order included) -> canonical int tensors, exactly.

Per quantized linear ``{module}`` (the logical weight is [out, in]; k = 32 / bits codes per int32):

- ``qweight`` int32 [in / k, out]: input column i of output column n is bits ``bits * (i % k)`` onward of
  ``qweight[i // k, n]``;
- ``qzeros`` int32 [G, out / k]: the zero point of group g, output n, at bits ``bits * (n % k)`` of
  ``qzeros[g, n // k]``. ``checkpoint_format`` "gptq" (v1, AutoGPTQ) stores the zero point minus one,
  masked to ``bits`` bits (so a true zero of 0 reads back as 2^bits: loaders add one per element, which is
  what the file means and what this reader does); "gptq_v2" stores it as is;
- ``scales`` [G, out] (fp16 as written);
- ``g_idx`` int32 [in]: the group of each input column; with ``desc_act`` (act-order) the groups are not
  contiguous. G = in / group_size, or 1 (``group_size: -1``: one scale per output channel).

Value: ``(q - z[g_idx[i]]) * s[g_idx[i]]`` in the scale dtype. Canonical (quant/int_layout.py): codes in
column order, or for act-order sorted by group with the permutation stored (``perm``); 4 bits: uint8 codes,
zeros uint8 (1..16 possible from v1 files); 8 bits: int8 codes ``q - 128``, zeros int16 ``z - 128``.
Symmetric checkpoints (``sym``) must have every zero at 2^(bits - 1) and drop them. Not here: file reading
(int_formats.py) and the config (quant_config.py).
"""

from __future__ import annotations

import torch

from mixtral.checkpoint.errors import CheckpointError
from mixtral.quant.base import QuantSpec, QuantTensors
from mixtral.quant.int_layout import pack_int4, permute_columns, sort_by_group

Entries = dict[str, tuple[str, tuple[int, ...]]]  # role -> (tensor name, shape)
BITS = (4, 8)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R / k, C] -> int32 [R, C]: row i is field i % k of packed row i // k."""
    k = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    fields = (packed.to(torch.int32)[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)  # [R/k, k, C]
    return fields.reshape(packed.shape[0] * k, packed.shape[1])


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C / k] -> int32 [R, C]: column c is field c % k of packed column c // k."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    fields = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)  # [R, C/k, k]
    return fields.reshape(packed.shape[0], -1)


def entries(module: str, out_features: int, in_features: int, qspec: QuantSpec) -> Entries:
    bits = int(qspec.method.removeprefix("int"))
    k = 32 // bits
    groups = in_features // qspec.group_size if qspec.group_size else 1
    return {"qweight": (f"{module}.qweight", (in_features // k, out_features)),
            "qzeros": (f"{module}.qzeros", (groups, out_features // k)),
            "scales": (f"{module}.scales", (groups, out_features)),
            "g_idx": (f"{module}.g_idx", (in_features,))}


OPTIONAL = ("g_idx",)  # exports without desc_act may leave it out


def act_order_perm(g_idx: torch.Tensor | None, qspec: QuantSpec) -> torch.Tensor | None:
    """The stored-column permutation of a linear (None: groups already contiguous)."""
    if g_idx is None or not qspec.group_size:
        return None
    try:
        return sort_by_group(g_idx, qspec.group_size)
    except ValueError as exc:
        raise CheckpointError(f"g_idx: {exc}") from exc


def finish_canonical(out: QuantTensors, qspec: QuantSpec, perm: torch.Tensor | None,
                     in_features: int) -> QuantTensors:
    """The last step shared by the int readers (GPTQ, compressed-tensors): per-channel formats (no group
    size) keep scales / zeros [out] instead of [out, 1]; act-order formats get ``perm`` (int32 [in], the
    identity where the groups were already contiguous)."""
    if not qspec.group_size:
        out = {k: (v[:, 0].contiguous() if k in ("scales", "zeros") else v) for k, v in out.items()}
    if qspec.act_order:
        out["perm"] = (perm if perm is not None else torch.arange(in_features)).to(torch.int32)
    return out


def to_canonical(t: dict[str, torch.Tensor], qspec: QuantSpec, module: str = "") -> QuantTensors:
    """One GPTQ linear's tensors (by role) -> canonical tensors in the format of ``qspec``."""
    bits = int(qspec.method.removeprefix("int"))
    q = unpack_rows(t["qweight"], bits).T  # [out, in] unsigned codes
    z = unpack_cols(t["qzeros"], bits).T.contiguous()  # [out, G]
    if qspec.checkpoint_format != "gptq_v2":
        z = z + 1  # v1 stored z - 1
    scales = t["scales"].T.contiguous()  # [out, G]
    perm = act_order_perm(t.get("g_idx"), qspec)
    if perm is not None:
        q = permute_columns(q, perm)
    mid = 1 << (bits - 1)
    out: QuantTensors = {}
    if qspec.symmetric:
        if bool((z != mid).any()):
            bad = int(z[z != mid][0])
            raise CheckpointError(f"{module}: the config says sym=true, but it has zero point {bad} "
                                  f"(symmetric {bits}-bit GPTQ zero points are {mid})")
    else:
        out["zeros"] = z.to(torch.uint8) if bits == 4 else (z - 128).to(torch.int16)
    out["qweight"] = pack_int4(q) if bits == 4 else (q - 128).to(torch.int8)
    out["scales"] = scales
    return finish_canonical(out, qspec, perm, q.shape[-1])

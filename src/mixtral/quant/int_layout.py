"""The canonical layout of integer weight-only schemes (int4 / int8 codes with group scales): one description,
:class:`IntFormat`, for every source (our own round-to-nearest, AWQ, GPTQ, compressed-tensors, GGUF), plus
its reference dequantization, round-to-nearest quantization and exact conversions between formats.

A weight ``[*lead, out, in]`` is stored as (every tensor's out axis is logical output rows, in order):

- ``qweight``: the codes. 4 bits: uint8 ``[*lead, out, in/2]``, column ``2j`` in the low nibble and ``2j+1`` in
  the high nibble of byte ``j``, unsigned 0..15. 8 bits: int8 ``[*lead, out, in]``.
- ``scales``: ``[*lead, out, in/g]`` in ``scale_dtype`` (``g`` = ``group_size``); ``[*lead, out]`` when
  ``group_size`` is 0 (one scale per output channel).
- ``zeros`` (``zero == "int"``): integer zero points shaped like ``scales``; uint8 for 4 bits (0..16: GPTQ's
  v1 files can say 16), int16 for 8 bits (in the signed code domain, -128..128).
- ``offsets`` (``zero == "float"``): a float added after scaling, shaped like ``scales`` in ``scale_dtype``
  (GGUF's ``-dmin * m`` of K-quants and ``m`` of Q4_1/Q5_1).
- ``perm`` (``act_order``): int32 ``[*lead, in]``: stored column ``j`` holds logical input column ``perm[j]``.

The value of a code ``c`` (column ``j``, group ``j // g``) in fp32 is

====================  ==============================  ==============================
zero                  4 bits                          8 bits
====================  ==============================  ==============================
"none" (symmetric)    ``(c - 8) * s``                 ``c * s``
"int"                 ``(c - z) * s``                 ``(c - z) * s``
"float"               ``c * s + o``                   ``c * s + o``
====================  ==============================  ==============================

and ``dequantize`` rounds it once to the requested dtype. Every product above is exact in fp32 for the
scale types used (a 16-bit scale times a <= 9-bit integer; GGUF K-quant scales are ``d * sc``, <= 18 bits,
times a <= 6-bit code), so this equals each format library's own dequantization: AWQ, GPTQ and
compressed-tensors compute ``(q - z) * s`` in the scale dtype (one rounding of the exact product), gguf in fp32.

Act-order (GPTQ ``desc_act``): a column's group is ``g_idx[col]``, so groups are not contiguous. The columns
are stored sorted by group (``perm`` = stable argsort of g_idx), which makes every group ``g`` contiguous
columns again; kernels read input column ``perm[j]`` for stored column ``j``. Each product
``x[perm[j]] * w[n, perm[j]]`` is the same as in logical order (only the summation order changes), and
``dequantize`` undoes the permutation, so the logical weight is bit-identical to the file's. The price: a
permuted weight cannot be sliced by logical columns (tensor-parallel row-parallel layers).

GGUF types (checkpoint/gguf_quants.py decodes the blocks) and their exact formats:

=========  =====  =====  ==========  =====  ===================================================
type       bits   group  scale       zero   codes
=========  =====  =====  ==========  =====  ===================================================
Q4_0       4      32     fp16 d      none   q (0..15), value (q - 8) * d
Q4_1       4      32     fp16 d      float  q, value q * d + m (m fp16)
Q5_0       8      32     fp16 d      none   q - 16
Q5_1       8      32     fp16 d      float  q, offset m
Q8_0       8      32     fp16 d      none   q (int8)
Q4_K       4      32     fp32 d*sc   float  q, offset -dmin * m
Q5_K       8      32     fp32 d*sc   float  q (0..31), offset -dmin * m
Q6_K       8      16     fp32 d*sc   none   q - 32
=========  =====  =====  ==========  =====  ===================================================

Not here: reading files (checkpoint/), the matmuls (quant/int_method.py and the kernels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mixtral.quant.base import QuantTensors, StoredTensor

ZERO_KINDS = ("none", "int", "float")
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class IntFormat:
    """How one integer-quantized weight is stored (see the module docstring for the value of a code)."""

    bits: int
    group_size: int  # input columns per scale; 0 = one scale per output channel
    scale_dtype: torch.dtype = torch.float16
    zero: str = "none"
    act_order: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"integer weights have 4 or 8 bits here, got {self.bits}")
        if self.group_size < 0 or (self.group_size and self.group_size % 2):
            raise ValueError(f"group_size must be 0 (per channel) or a positive even number, got {self.group_size}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale dtype {self.scale_dtype} is not one of {SCALE_DTYPES}")
        if self.zero not in ZERO_KINDS:
            raise ValueError(f"zero must be one of {ZERO_KINDS}, got {self.zero!r}")
        if self.act_order and not self.group_size:
            raise ValueError("act-order needs group scales (group_size > 0)")

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.uint8 if self.bits == 4 else torch.int8

    @property
    def zero_dtype(self) -> torch.dtype:
        return torch.uint8 if self.bits == 4 else torch.int16

    def stored(self) -> list[StoredTensor]:
        g = self.group_size
        out = [StoredTensor("qweight", self.code_dtype, 1, 2 if self.bits == 4 else 1),
               StoredTensor("scales", self.scale_dtype, 1, g)]
        if self.zero == "int":
            out.append(StoredTensor("zeros", self.zero_dtype, 1, g))
        elif self.zero == "float":
            out.append(StoredTensor("offsets", self.scale_dtype, 1, g))
        if self.act_order:
            out.append(StoredTensor("perm", torch.int32, 0, 1, in_only=True))
        return out

    def check_shape(self, out_features: int, in_features: int) -> None:
        """A clear error when this format cannot hold a logical [out, in] weight."""
        g = self.group_size
        if self.bits == 4 and in_features % 2:
            raise ValueError(f"int4 codes pair input columns: in_features {in_features} is odd")
        if g and in_features % g:
            raise ValueError(f"group size {g} does not divide in_features {in_features}; pick a group size that "
                             f"divides every input width (e.g. {math.gcd(in_features, g)})")

    @classmethod
    def of(cls, t: QuantTensors) -> IntFormat:
        """The format a set of stored tensors is in (kernels and ``dequantize`` read it from the tensors, so
        two weights of one layer may differ: a GGUF Q4_K_M file mixes Q4_K and Q6_K experts)."""
        codes, scales = t["qweight"], t["scales"]
        bits = 4 if codes.dtype == torch.uint8 else 8
        in_features = codes.shape[-1] * (2 if bits == 4 else 1)
        per_channel = scales.dim() == codes.dim() - 1
        group = 0 if per_channel else in_features // scales.shape[-1]
        zero = "int" if "zeros" in t else "float" if "offsets" in t else "none"
        return cls(bits, group, scales.dtype, zero, "perm" in t)


# ----------------------------------------------------------------------------- nibble packing
def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes [..., K] (integers 0..15, any int dtype) -> uint8 [..., K/2]: column 2j low nibble, 2j+1 high."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> uint8 [..., K] codes 0..15 (inverse of :func:`pack_int4`)."""
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


# ----------------------------------------------------------------------------- reference dequantization
def _per_column(t: torch.Tensor, fmt: IntFormat, in_features: int) -> torch.Tensor:
    """A per-group tensor [..., out, in/g] (or per-channel [..., out]) -> [..., out, in] by repetition."""
    if not fmt.group_size:
        return t.unsqueeze(-1).expand(*t.shape, in_features)
    return t.repeat_interleave(fmt.group_size, dim=-1)


def code_values(t: QuantTensors, fmt: IntFormat | None = None) -> torch.Tensor:
    """The stored codes as int32 values ``c - zero`` (float form: ``c``), in stored column order [..., out, in]."""
    fmt = fmt or IntFormat.of(t)
    codes = t["qweight"]
    c = unpack_int4(codes).to(torch.int32) if fmt.bits == 4 else codes.to(torch.int32)
    if fmt.zero == "int":
        c = c - _per_column(t["zeros"].to(torch.int32), fmt, c.shape[-1])
    elif fmt.zero == "none" and fmt.bits == 4:
        c = c - 8
    return c


def _grouped(t: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    """A per-group tensor [..., out, G] (per channel: [..., out]) as [..., out, G, 1], to broadcast over the
    [..., out, G, g] view of the codes."""
    return t.unsqueeze(-1) if fmt.group_size else t[..., None, None]


def dequantize(t: QuantTensors, dtype: torch.dtype) -> torch.Tensor:
    """The stored tensors -> the logical weight [..., out, in] in ``dtype`` (computed in fp32, rounded once).

    Works on the [..., out, G, g] view of the codes with the group tensors broadcast (no per-column copies)."""
    fmt = IntFormat.of(t)
    codes = t["qweight"]
    c = unpack_int4(codes) if fmt.bits == 4 else codes
    *lead, out_features, in_features = c.shape
    g = fmt.group_size or in_features
    w = c.reshape(*lead, out_features, in_features // g, g).to(torch.float32)  # [..., out, G, g]
    if fmt.zero == "int":
        w = w - _grouped(t["zeros"].to(torch.float32), fmt)
    elif fmt.zero == "none" and fmt.bits == 4:
        w = w - 8.0
    w = w * _grouped(t["scales"].to(torch.float32), fmt)
    if fmt.zero == "float":
        w = w + _grouped(t["offsets"].to(torch.float32), fmt)
    w = w.reshape(*lead, out_features, in_features)
    if fmt.act_order:
        logical = torch.empty_like(w)
        perm = t["perm"].to(torch.int64)
        logical.scatter_(-1, perm.unsqueeze(-2).expand_as(w), w)  # logical[..., n, perm[j]] = w[..., n, j]
        w = logical
    return w.to(dtype)


# ----------------------------------------------------------------------------- round to nearest
def _round_up(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 scales -> ``dtype``, rounded up where rounding to nearest went down, so the grid still reaches the
    group's extremes (no clipping beyond half a step)."""
    r = s.to(dtype)
    low = r.to(torch.float32) < s
    return torch.where(low, torch.nextafter(r, torch.full_like(r, float("inf"))), r)


def quantize_rtn(w: torch.Tensor, fmt: IntFormat) -> QuantTensors:
    """w [..., out, in] -> stored tensors, round to nearest per group (no act-order, no float offsets).

    Symmetric ("none"): s = absmax / 7 (4 bits) or / 127 (8 bits), codes clamp(round(w / s)): no clipping,
    the code -8 (or -128) unused. Asymmetric ("int"): s = (max - min) / (2^bits - 1) over the group's range
    widened to include 0, z = round(-min / s). The scale is rounded up to ``scale_dtype`` first and the codes
    are computed with the rounded scale, so every weight is within half a step. All-zero groups get s = 0.
    """
    if fmt.zero == "float" or fmt.act_order:
        raise ValueError(f"round-to-nearest makes symmetric or integer-zero formats, not {fmt}")
    *lead, out_features, in_features = w.shape
    fmt.check_shape(out_features, in_features)
    g = fmt.group_size or in_features
    wf = w.to(torch.float32).reshape(*lead, out_features, in_features // g, g)  # [..., out, G, g]
    qmax = (1 << fmt.bits) - 1
    if fmt.zero == "none":
        half = (1 << (fmt.bits - 1)) - 1  # 7 or 127
        s = _round_up(wf.abs().amax(dim=-1) / half, fmt.scale_dtype)  # [..., out, G]
        sf = s.to(torch.float32)
        q = torch.round(wf / torch.where(sf == 0, 1.0, sf)[..., None]).clamp(-half, half)
        codes = (q + 8) if fmt.bits == 4 else q
        zeros = None
    else:
        lo = wf.amin(dim=-1).clamp(max=0.0)
        hi = wf.amax(dim=-1).clamp(min=0.0)
        s = _round_up((hi - lo) / qmax, fmt.scale_dtype)
        sf = torch.where(s.to(torch.float32) == 0, 1.0, s.to(torch.float32))
        z = torch.round(-lo / sf).clamp(0, qmax)  # [..., out, G] unsigned domain
        codes = (torch.round(wf / sf[..., None]) + z[..., None]).clamp(0, qmax)
        if fmt.bits == 8:  # signed code domain: c - 128, z - 128
            codes, z = codes - 128, z - 128
        zeros = z.to(fmt.zero_dtype)
    codes = codes.reshape(*lead, out_features, in_features).to(torch.int32)
    qweight = pack_int4(codes) if fmt.bits == 4 else codes.to(torch.int8)
    per = (lambda x: x.squeeze(-1)) if not fmt.group_size else (lambda x: x)
    out: QuantTensors = {"qweight": qweight, "scales": per(s)}
    if zeros is not None:
        out["zeros"] = per(zeros)
    return out


# ----------------------------------------------------------------------------- act-order permutation
def sort_by_group(g_idx: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """A GPTQ ``g_idx`` [in] (group of each logical column) -> ``perm`` [in] int64 (stable argsort), or None when
    the groups are already contiguous (g_idx == arange(in) // g). Raises when a group does not have exactly
    ``group_size`` columns (then no regular layout can hold it)."""
    in_features = g_idx.shape[-1]
    if in_features % group_size:
        raise ValueError(f"g_idx has {in_features} columns, not a multiple of group_size {group_size}")
    g_idx = g_idx.to(torch.int64)
    if torch.equal(g_idx, torch.arange(in_features) // group_size):
        return None
    counts = torch.bincount(g_idx, minlength=in_features // group_size)
    if counts.numel() != in_features // group_size or bool((counts != group_size).any()):
        raise ValueError(f"g_idx does not give every group exactly {group_size} columns (counts "
                         f"{counts.tolist()[:8]}...): not a GPTQ act-order permutation")
    return torch.argsort(g_idx, stable=True)


def permute_columns(codes: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Unpacked per-column codes [..., out, in] in logical order -> stored order (column j = logical perm[j])."""
    return codes.index_select(-1, perm.to(torch.int64))


# ----------------------------------------------------------------------------- exact conversions
def common_format(formats: list[IntFormat]) -> IntFormat:
    """The narrowest format that holds each of ``formats`` exactly (pieces of one fused weight, e.g. a GGUF
    Q4_K_M file's Q4_K wq with Q8_0 wk/wv): the most bits, the smallest group (it must divide the others),
    fp32 scales unless all agree, float offsets if any has them (then fp32, where ``-z * s`` is exact)."""
    first = formats[0]
    if any(f.act_order != first.act_order for f in formats):
        raise ValueError("pieces of one weight mix act-order and plain column order")
    bits = max(f.bits for f in formats)
    groups = {f.group_size for f in formats}
    group = min(groups - {0}) if groups - {0} else 0
    if group and any(g and g % group for g in groups):
        raise ValueError(f"group sizes {sorted(groups)} cannot share one layout (none divides the others)")
    dtypes = {f.scale_dtype for f in formats}
    zeros = {f.zero for f in formats}
    zero = "float" if "float" in zeros else "int" if "int" in zeros else "none"
    scale_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    if zero == "float" and any(f.zero != "float" for f in formats):
        scale_dtype = torch.float32  # -z * s computed exactly
    return IntFormat(bits, group, scale_dtype, zero, first.act_order)


def convert(t: QuantTensors, dst: IntFormat) -> QuantTensors:
    """Re-express stored tensors in format ``dst`` without changing any dequantized value (fp32-exact); raises
    when that is impossible (fewer bits, a coarser group, an inexact offset)."""
    src = IntFormat.of(t)
    if src == dst:
        return t
    if dst.bits < src.bits:
        raise ValueError(f"cannot hold {src.bits}-bit codes in {dst.bits} bits")
    if src.act_order != dst.act_order:
        raise ValueError("cannot add or drop an act-order permutation by conversion")
    in_features = t["qweight"].shape[-1] * (2 if src.bits == 4 else 1)
    if dst.group_size and (src.group_size or in_features) % dst.group_size:
        raise ValueError(f"group {src.group_size or in_features} cannot be re-expressed with group {dst.group_size}")
    if not dst.group_size and src.group_size:
        raise ValueError("group scales cannot become one scale per channel")

    def regroup(x: torch.Tensor) -> torch.Tensor:  # [..., out, in/g_src] (or [..., out]) -> dst's grouping
        if not dst.group_size:
            return x
        if not src.group_size:
            x = x.unsqueeze(-1)
        return x.repeat_interleave((src.group_size or in_features) // dst.group_size, dim=-1)

    # src as stored codes c and integer zeros z with value (c - z) * s, or (float form) c * s + o.
    c = unpack_int4(t["qweight"]).to(torch.int32) if src.bits == 4 else t["qweight"].to(torch.int32)
    s32 = regroup(t["scales"].to(torch.float32))
    if src.zero == "float":
        z, off32 = None, regroup(t["offsets"].to(torch.float32))
    else:
        z = regroup(t["zeros"].to(torch.int32)) if src.zero == "int" else torch.full_like(
            s32, 8 if src.bits == 4 else 0, dtype=torch.int32)
        off32 = None
    out: QuantTensors = {}
    if dst.zero == "float":
        if z is not None:  # value (c - z) * s = c * s + (-z * s); -z * s must be exact in fp32
            shift = -z.to(torch.float64) * s32.to(torch.float64)
            off32 = shift.to(torch.float32)
            if not torch.equal(off32.to(torch.float64), shift):
                raise ValueError("zero points times scales are not exact in fp32: cannot convert to float offsets")
        assert off32 is not None
        out["offsets"] = off32.to(dst.scale_dtype)
    elif z is None:
        raise ValueError(f"float offsets of {src} cannot become integer zero points")
    elif dst.zero == "int":
        out["zeros"] = z.to(dst.zero_dtype)
    else:  # symmetric dst: the code is the value (+ 8 for 4 bits)
        c = c - _per_column(z, dst, c.shape[-1]) + (8 if dst.bits == 4 else 0)
    scales = s32.to(dst.scale_dtype)
    if not torch.equal(scales.to(torch.float32), s32) or (
            "offsets" in out and not torch.equal(out["offsets"].to(torch.float32), off32)):
        raise ValueError(f"scales of {src} do not fit {dst.scale_dtype} exactly")
    out["scales"] = scales
    lo, hi = (0, 15) if dst.bits == 4 else (-128, 127)
    if bool((c < lo).any()) or bool((c > hi).any()):
        raise ValueError(f"codes of {src} do not fit {dst.bits}-bit codes of {dst}")
    out["qweight"] = pack_int4(c) if dst.bits == 4 else c.to(torch.int8)
    if src.act_order:
        out["perm"] = t["perm"]
    return {s.name: out[s.name] for s in dst.stored()}

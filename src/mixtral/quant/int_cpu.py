"""CPU fast path of the integer schemes: PyTorch's packed CPU matmuls on weights repacked once at load.

``torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, g, scale_and_zero)`` multiplies by a weight whose
element is ``(q - 8) * S + Z`` (q 4-bit, S and Z per group of ``g`` in {32, 64, 128, 256} columns, in x's
dtype, N a multiple of 16); ``_weight_int8pack_mm(x, w_int8, s)`` by ``w * s`` per output channel. Every
canonical format maps onto them exactly in fp32 arithmetic (module docstring of int_layout.py for values):

- int4: q = code; S = s; Z = 0 (symmetric), (8 - z) * s (integer zero), 8 s + o (float offset).
- int8, symmetric per channel: ``_weight_int8pack_mm`` with the codes as they are.
- int8 otherwise: the unsigned code u = c + 128 splits into nibbles h, l (u = 16 h + l), so
  c = 16 (h - 8) + (l - 8) + 8 and the weight is two int4 weights: hi (q = h, S = 16 s, Z = 0) plus lo
  (q = l, S = s, Z = 8 s - z s + o). Both halves are packed side by side as ONE int4 weight of width 2K
  ([hi | lo], key ``cpu_q8x2``) multiplied by the input written twice ([x | x]): one packed matmul whose fp32
  accumulator sums both halves before its one rounding. Measured against two matmuls summed (one thread, bf16,
  the demo model's 640 x 192 and 192 x 320 Q8_0 experts): M = 1 13.2 -> 9.7 and 9.7 -> 6.2 us, M = 4 18.3 ->
  14.4 and 12.0 -> 8.8 us, level from M = 16; and its error against the fp32 truth is the reference's (two
  halves each rounded to bf16 then summed and rounded again had ~1.4x it).

S and Z are rounded once to the activation dtype (bf16: a relative 2^-9 on a weight, the size of rounding the
weight itself to bf16, which the reference does). The packed kernels have no fast fp32 version (measured
~30-100x slower than bf16 on this CPU), so only bf16 / fp16 activations are packed; other dtypes keep the
canonical tensors and the reference path. Weights the kernels cannot take (groups of 16, as GGUF Q6_K; N not
a multiple of 16) also stay canonical.

Large M (prefill, big batches): both packed kernels cost the same per activation row at every M (a 640 x 192
int4 weight, one thread: ~1.45 us a row at M = 1 and at M = 1024; int8 per channel ~2.5 us), while oneDNN's bf16
GEMM gets cheaper per row as M grows (0.5 us a row at M = 512: 2.7x faster than int4, 4.6x than int8). From
``LARGE_M`` rows ``packed_linear`` therefore dequantizes the packed weight in blocks of rows (~1 ns a weight:
int4 codes read straight from PyTorch's packed layout, checked once per process by ``int4pack_layout_known``;
off, with the packed kernel kept, where it does not match) and multiplies with ``F.linear``. Demo model, 16
prompts of 128 tokens, one thread: prefill 0.150 -> 0.080 s (Q8_0 file), 0.100 -> 0.076 s (Q4_0), 0.140 ->
0.085 s (int8 per channel), against 0.072 s in bf16.

Integer dots (KernelConfig.cpu_int_kernel ``auto``/``native``, bf16 activations, the layout of
quant/int_native.py): on an x86 CPU with AVX512-VNNI or AVX2 the matmul is kernels/int_dot.c instead, at every
M. It rounds each activation row to int8 in blocks of 32 (as llama.cpp does) and multiplies the codes as
integers (VNNI: 64 products an instruction), where the packed kernels convert every weight to floating point
first. Measured one thread,
weights in cache, M = 1: 14336 x 2048 int4 g32 206 us against 705, 2048 x 7168 104 against 357; from DRAM in the
`cpu-1.6b` model (2 threads) the int4 experts run at ~50 GB/s, the machine's read bandwidth. At prefill sizes it
still beats dequantizing for oneDNN's bf16 GEMM (14336 x 2048, M = 192, one thread: 22 ms against 95), so no
large-M path. The price is the int8 activations: ~0.5% of a product's norm (tests/kernels/test_cpu_native.py;
model-level figures in docs/QUANTIZATION.md). ``packed`` keeps the packed kernels (bf16 activations, what the
GPU kernels compute); ``auto`` falls back to them where the kernel cannot run (no AVX2, no C compiler) or the
weight does not fit it (fp16 activations, N not a multiple of 16, K not of 32, groups not of 16). Groups of 16
(GGUF Q6_K, Q3_K, Q2_K), which the packed kernels cannot take (they stay canonical there: the reference path,
dequantizing the weight on every call), run in 16-column units of the kernel.

Measured against bf16 ``F.linear`` and the reference (dequantize then matmul) in BENCHMARKS-style notes in
docs/QUANTIZATION.md. Not here: the GPU kernels (kernels/triton/int_*.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mixtral.kernels.cpu_native import int_dot_matmul, native_int_dot
from mixtral.kernels.moe_grouped import grouped_experts
from mixtral.quant import int_native
from mixtral.quant.base import QuantTensors
from mixtral.quant.int_layout import IntFormat, dequantize, unpack_int4

CPU_GROUPS = (256, 128, 64, 32)  # the group sizes _weight_int4pack_mm_for_cpu takes
PACKED_DTYPES = (torch.bfloat16, torch.float16)
# Rows of a weight dequantized at once by the fallback (bounds its temporary to ~64 MB of fp32).
_FALLBACK_ROWS = 4096
# From this many activation rows a packed weight is dequantized (in blocks of rows) and multiplied by oneDNN's
# bf16 GEMM instead of the packed kernel, per layout (module docstring, "Large M"). Measured crossovers, one
# thread, bf16, on 640 x 192 / 192 x 320 (the demo's experts) and 4096 x 1024: int8 per channel 32-64 rows,
# [hi | lo] int8 ~128, int4 ~128-224.
LARGE_M = {"cpu_q8": 48, "cpu_q8x2": 128, "cpu_q4": 192}
# Below this many rows no layout is dequantized, whatever LARGE_M says: decode-sized calls skip the per-layout
# look-up (~1 us a call, a few percent of a batch-1 MoE layer).
_LARGE_M_FLOOR = 32
# Weights dequantized at once by the large-M path: the fp32 temporaries of a block stay in cache (a whole 8x7B
# expert's would not: measured 9 ns a weight unblocked against ~1 in blocks).
_DEQUANT_BLOCK = 1 << 18


def cpu_group(fmt: IntFormat, in_features: int) -> int:
    """The packed kernels' group for ``fmt``: the largest of CPU_GROUPS dividing its group (per channel: the
    width), 0 when none does."""
    g = fmt.group_size or in_features
    return next((c for c in CPU_GROUPS if g % c == 0 and in_features % c == 0), 0)


def _pack(qweight: torch.Tensor, nibble: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Canonical codes [*lead, N, *] -> the int4pack layout [*lead, N, K/2] of ``nibble(matrix)`` (uint8 codes
    0..15 [N, K]), one 2-D matrix at a time so the int32 temporary stays one matrix."""
    flat = qweight.reshape(-1, *qweight.shape[-2:])
    packed = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibble(m).to(torch.int32).contiguous(), 1)
              for m in flat]
    return torch.stack(packed).reshape(*qweight.shape[:-2], *packed[0].shape)


def _scale_zero(scale: torch.Tensor, zero: torch.Tensor, rep: int, dtype: torch.dtype) -> torch.Tensor:
    """fp32 S, Z [*lead, N, G] -> [*lead, G * rep, N, 2] in ``dtype`` (each group repeated ``rep`` times)."""
    zero = zero.expand_as(scale)
    sz = torch.stack((scale.repeat_interleave(rep, -1), zero.repeat_interleave(rep, -1)), dim=-1)  # [.., N, G', 2]
    return sz.transpose(-3, -2).contiguous().to(dtype)


def prepare_cpu(t: QuantTensors, act_dtype: torch.dtype | None, kernel: str = "auto") -> QuantTensors:
    """Canonical tensors -> the CPU layout for ``act_dtype`` activations, or ``t`` unchanged when no CPU kernel
    fits (see the module docstring). ``kernel`` (KernelConfig.cpu_int_kernel): ``native``/``auto`` take the
    integer-dot kernel's layout (quant/int_native.py: ``cpu_n4``/``cpu_n8``, ``cpu_ns``, ``cpu_nz``) for bf16
    activations where it runs and fits, else the packed layouts: ``cpu_q8``/``cpu_s8`` (int8 per channel), int4
    ``cpu_q4``/``cpu_sz``, other int8 ``cpu_q8x2``/``cpu_sz`` (the hi and lo nibble weights side by side, K 2K).
    ``perm`` is kept."""
    if act_dtype not in PACKED_DTYPES:
        return t
    fmt = IntFormat.of(t)
    codes = t["qweight"]
    n, k = codes.shape[-2], codes.shape[-1] * (2 if fmt.bits == 4 else 1)
    out: QuantTensors = {"perm": t["perm"]} if fmt.act_order else {}
    if kernel != "packed" and act_dtype == torch.bfloat16 and int_native.fits(n, k, fmt.group_size or k) \
            and native_int_dot() is not None:
        s, zero_term = _s_and_zero_term(t, fmt)
        if fmt.bits == 4:  # (q - 8) S + Z as below; int8: (u - 128) S + Z with u = c + 128, Z the zero term
            z = zero_term + 8 * s if fmt.zero != "none" else None
        else:
            z = zero_term if fmt.zero != "none" else None
        def unsigned(c: torch.Tensor) -> torch.Tensor:
            return _unsigned_codes(c, fmt.bits)

        return {**out, **int_native.pack_native(codes, unsigned, fmt.bits, s, z, act_dtype)}
    if fmt.bits == 8 and fmt.zero == "none" and fmt.group_size == 0:
        out["cpu_q8"] = codes.contiguous()
        out["cpu_s8"] = t["scales"].to(act_dtype)
        return out
    cpu_g = cpu_group(fmt, k)
    if not cpu_g or n % 16:
        return t
    s, zero_term = _s_and_zero_term(t, fmt)
    rep = (fmt.group_size or k) // cpu_g
    if fmt.bits == 4:
        # (q - 8) S + Z: symmetric codes carry their zero 8 already (Z = 0); otherwise Z = 8 s - z s + o.
        z_packed = zero_term + 8 * s if fmt.zero != "none" else zero_term
        out["cpu_q4"] = _pack(codes, unpack_int4)
        out["cpu_sz"] = _scale_zero(s, z_packed, rep, act_dtype)
        return out
    def unsigned(c: torch.Tensor) -> torch.Tensor:  # int8 code -> u = c + 128 as uint8
        return c.view(torch.uint8) ^ 0x80

    # [hi | lo] along K: hi groups first (S = 16 s, Z = 0), then lo groups (S = s, Z = 8 s - z s + o).
    out["cpu_q8x2"] = _pack(codes, lambda c: torch.cat((unsigned(c) >> 4, unsigned(c) & 0xF), dim=-1))
    out["cpu_sz"] = torch.cat((_scale_zero(16 * s, torch.zeros_like(s), rep, act_dtype),
                               _scale_zero(s, 8 * s + zero_term, rep, act_dtype)), dim=-3)  # [.., 2G', N, 2]
    return out


def _s_and_zero_term(t: QuantTensors, fmt: IntFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 per-group S [.., N, G] (per channel: one group spanning K) and what (c - z) s + o adds to c s."""
    unsq = (lambda v: v.unsqueeze(-1)) if fmt.group_size == 0 else (lambda v: v)
    s = unsq(t["scales"].to(torch.float32))
    if fmt.zero == "int":
        return s, -unsq(t["zeros"].to(torch.float32)) * s
    if fmt.zero == "float":
        return s, unsq(t["offsets"].to(torch.float32))
    return s, torch.zeros_like(s)


def _unsigned_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Canonical codes [*lead, N, *] -> uint8 [*lead, N, K]: int4 0..15 as stored, int8 c + 128."""
    return unpack_int4(codes) if bits == 4 else codes.view(torch.uint8) ^ 0x80


PACKED_KEYS = ("cpu_q4", "cpu_q8x2", "cpu_q8", *int_native.NATIVE_KEYS)  # the packed weight of each layout


def is_packed(t: QuantTensors) -> bool:
    return any(k in t for k in PACKED_KEYS)


def _mm4(x: torch.Tensor, q: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ the packed int4 weight q [N, K/2] with scale_and_zero sz [G, N, 2] -> [M, N]."""
    k = q.shape[-1] * 2
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, q, k // sz.shape[-3], sz)


def packed_linear(x: torch.Tensor, t: QuantTensors, expert: int | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N] through the packed layout (``expert`` picks one matrix of a stacked [E, ...] weight).
    x is cast to the packed scales' dtype and the result back to x's dtype. At decode sizes the matmul itself
    takes a few microseconds, so casts that would do nothing are not called."""
    def pick(name: str) -> torch.Tensor:
        return t[name] if expert is None else t[name][expert]

    if "perm" in t:
        x = x.index_select(-1, pick("perm").to(torch.int64))  # stored column j reads input perm[j]
    key = int_native.native_key(t)
    if key is not None:
        return _native_linear(x, t, key, pick)
    if x.shape[0] >= _LARGE_M_FLOOR and x.shape[0] >= _large_m(t):
        return _dequantized_linear(x, t, pick)
    if "cpu_q8" in t:
        s = pick("cpu_s8")
        xs = (x if x.dtype == s.dtype else x.to(s.dtype)).contiguous()
        y = torch.ops.aten._weight_int8pack_mm(xs, pick("cpu_q8"), s)
        return y if y.dtype == x.dtype else y.to(x.dtype)
    sz = pick("cpu_sz")
    xs = x if x.dtype == sz.dtype else x.to(sz.dtype)
    if "cpu_q8x2" in t:
        y = _mm4(torch.cat((xs, xs), dim=-1), pick("cpu_q8x2"), sz)  # [x | x] @ [hi | lo]^T: [M, N]
    else:
        y = _mm4(xs.contiguous(), pick("cpu_q4"), sz)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _native_linear(x: torch.Tensor, t: QuantTensors, key: str, pick: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """``packed_linear`` on the integer-dot layout, at every M: its integer dots outrun dequantizing the weight
    for oneDNN's bf16 GEMM even at prefill sizes (module docstring, "Integer dots")."""
    w, s = pick(key), pick("cpu_ns")  # [T, bytes], [T, G, 16]
    z = pick("cpu_nz") if "cpu_nz" in t else None
    xs = (x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)).contiguous()
    y = int_dot_matmul(xs, w, 4 if key == "cpu_n4" else 8, x.shape[-1] // s.shape[-2], s, z, 16 * w.shape[-2])
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _large_m(t: QuantTensors) -> int:
    """The activation rows from which ``packed_linear`` dequantizes ``t`` instead (a huge number where it cannot:
    int4 layouts need 64-row blocks and PyTorch's packed layout as ``int4pack_layout_known`` checked it)."""
    if "cpu_q8" in t:
        return LARGE_M["cpu_q8"]
    key = "cpu_q8x2" if "cpu_q8x2" in t else "cpu_q4"
    if t[key].shape[-2] % 64 or not int4pack_layout_known():
        return 1 << 62
    return LARGE_M[key]


def _unpack_int4pack(q: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """One packed int4 weight, rows a multiple of 64: q [r, K/2] uint8 in ``_convert_weight_to_int4pack_for_cpu``'s
    layout, sz [G, r, 2] -> the fp32 weight [r, K], (q - 8) S + Z. The layout (PyTorch 2.x, checked at run time by
    ``int4pack_layout_known``): each block of 64 rows is [K, 32] bytes; byte (k, j) holds row j's code at column k
    in its low nibble and row 32 + j's in its high nibble."""
    r, k = q.shape[0], q.shape[1] * 2
    g = k // sz.shape[0]
    v = q.reshape(r // 64, k, 32)
    codes = torch.stack((v & 0xF, v >> 4), dim=1).transpose(2, 3).reshape(r, k // g, g)  # [r, G, g] uint8
    s = sz[..., 0].t().unsqueeze(-1).float()  # [r, G, 1]
    z = sz[..., 1].t().unsqueeze(-1).float()
    return ((codes.float() - 8) * s + z).reshape(r, k)


@functools.cache
def int4pack_layout_known() -> bool:
    """Whether this PyTorch packs int4 weights in the layout ``_unpack_int4pack`` reads: a 128 x 64 probe packed
    and read back (S = 1, Z = 8: the weight is the code itself)."""
    codes = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    if packed.dtype != torch.uint8 or packed.shape != (128, 32):
        return False
    sz = torch.stack((torch.ones(1, 128), torch.full((1, 128), 8.0)), dim=-1).bfloat16()  # [1, 128, 2]
    return torch.equal(_unpack_int4pack(packed, sz), codes.float())


def _dequantized_linear(x: torch.Tensor, t: QuantTensors, pick: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """``packed_linear`` at large M: blocks of output rows dequantized from the packed layout (fp32, then the
    packed dtype: the value the packed kernel multiplies by, rounded once) and multiplied by ``F.linear``."""
    if "cpu_q8" in t:
        q, s = pick("cpu_q8"), pick("cpu_s8")
        dtype = s.dtype
    else:
        q, sz = pick("cpu_q8x2" if "cpu_q8x2" in t else "cpu_q4"), pick("cpu_sz")
        dtype = sz.dtype
    n, k_in = q.shape[0], x.shape[-1]
    xs = (x if x.dtype == dtype else x.to(dtype)).contiguous()
    rows = max(64, _DEQUANT_BLOCK // k_in // 64 * 64)  # a multiple of 64: whole int4pack blocks
    out = torch.empty(x.shape[0], n, dtype=dtype)  # [M, N]
    for r in range(0, n, rows):
        block = slice(r, min(n, r + rows))
        if "cpu_q8" in t:
            w = q[block].float() * s[block].float()[:, None]  # [r, K]
        else:
            w = _unpack_int4pack(q[block], sz[:, block])  # [r, K] or [r, 2K]
            if w.shape[1] != k_in:
                w = w[:, :k_in] + w[:, k_in:]  # [hi | lo] -> hi + lo (fp32: exact for symmetric codes)
        out[:, block] = F.linear(xs, w.to(dtype))
    return out if out.dtype == x.dtype else out.to(x.dtype)


def reference_linear(x: torch.Tensor, t: QuantTensors, expert: int | None = None) -> torch.Tensor:
    """Dequantize then ``F.linear`` in x's dtype, in blocks of rows so a large weight never has a full fp32
    copy (the path for weights no packed kernel takes)."""
    sub = t if expert is None else {k: v[expert] for k, v in t.items()}
    n = sub["qweight"].shape[-2]
    if n <= _FALLBACK_ROWS:
        return F.linear(x, dequantize(sub, x.dtype))
    pieces = []
    for r in range(0, n, _FALLBACK_ROWS):
        rows = {k: (v if k == "perm" else v[r:r + _FALLBACK_ROWS]) for k, v in sub.items()}
        pieces.append(F.linear(x, dequantize(rows, x.dtype)))
    return torch.cat(pieces, dim=-1)


def cpu_linear(x: torch.Tensor, t: QuantTensors, expert: int | None = None) -> torch.Tensor:
    return packed_linear(x, t, expert) if is_packed(t) else reference_linear(x, t, expert)


def cpu_moe(x: torch.Tensor, w13: QuantTensors, w2: QuantTensors, topk_weights: torch.Tensor,
            topk_ids: torch.Tensor, expert_start: int = 0) -> torch.Tensor:
    """The experts on CPU, grouped as the float experts are (kernels/moe_grouped.py ``grouped_experts``: each
    expert hit runs once on its rows, in the reference's order), each GEMM through ``cpu_linear``: only the
    chosen experts' weights are read."""
    num_local = next(w13[k] for k in (*PACKED_KEYS, "qweight") if k in w13).shape[0]

    def ffn(e: int, rows: torch.Tensor) -> torch.Tensor:
        gate, up = cpu_linear(rows, w13, e).chunk(2, dim=-1)  # [c, F] each
        return cpu_linear(F.silu(gate) * up, w2, e)  # [c, D]

    return grouped_experts(x, topk_weights, topk_ids, expert_start, num_local, ffn)

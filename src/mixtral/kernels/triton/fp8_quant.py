"""Per-row (per-token) FP8 quantization of activations in Triton, and the e4m3 rounding the FP8 kernels share.

``quantize_rows(x, static_scale)`` is ``quant/fp8.quantize_rows`` on the device: x [M, K] -> codes fp8 [M, K]
and scales fp32 [M] (max|row| / 448, or the static scale for every row). One program per row: a pass for
the row's largest magnitude, a pass that divides, saturates, rounds and stores. The codes equal PyTorch's
(IEEE division via ``div_rn``, round to nearest even), so a kernel test can compare them exactly.

Why a launch of its own rather than fused into the GEMMs: a row's scale needs the whole row, and the GEMM
programs each own a slice of the output columns, so every one of them would redo the row's max (hundreds
of programs per token at decode); the quantized row is instead written once ([M, K] bytes, a few us at most)
and every GEMM program reads it. The decode MoE runs it twice a layer (x before w13, the SiLU product
before w2), the dense projections once per input.

``round_e4m3``: Triton's interpreter converts fp32 to fp8 wrongly where rounding carries into the next
power of two (31.6 becomes 16, not 32) and rounds ties away from zero; rounding in fp32 arithmetic first
makes the final conversion exact on the interpreter and the GPU alike.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixtral.kernels.triton.pdl import pdl_args, pdl_enter
from mixtral.quant.fp8 import AMAX_FLOOR, FP8

MAX_BLOCK = 4096  # columns per step of a row


@triton.jit
def round_e4m3(x):
    """fp32 x (|x| <= 448) -> the nearest e4m3 value (ties to even), still fp32, so ``.to(float8e4nv)`` is exact.

    e4m3 keeps 3 mantissa bits: the step at |x| in [2^e, 2^(e+1)) is 2^(e-3), and 2^-9 below 2^-6
    (subnormals). Adding then subtracting c = 1.5 * 2^(e+20), whose fp32 ulp is that step, rounds x to a
    multiple of it in one IEEE add; c's 1.5 keeps x + c inside c's binade for negative x too."""
    bits = x.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    c = (((e + 147) << 23) | 0x400000).to(tl.float32, bitcast=True)  # 1.5 * 2^(e + 20)
    return (x + c) - c


@triton.jit
def to_e4m3(x, scale):
    """fp32 x / scale saturated to +-448 (``quant.fp8.FP8_MAX``), rounded to e4m3 codes (``quant.fp8.to_fp8``)."""
    q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0)
    return round_e4m3(q).to(tl.float8e4nv)


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, scale_ptr, static_ptr, num_rows_ptr, ids_ptr, K, stride_x, stride_q, amax_floor,
                       expert_lo, expert_hi, STATIC: tl.constexpr, BOUNDED: tl.constexpr, BY_EXPERT: tl.constexpr,
                       BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Row r: scale[r] = max(max|x[r]|, floor) / 448 (or the static scale); q[r] = e4m3(x[r] / scale[r]).
    Skipped (left unwritten): with BOUNDED the rows from num_rows[0] on, with BY_EXPERT the rows whose
    ids[r] is outside [expert_lo, expert_hi)."""
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    if BOUNDED:  # noqa: SIM102 (a constexpr guard: without it num_rows_ptr is never loaded)
        if row >= tl.load(num_rows_ptr):
            return
    if BY_EXPERT:
        e = tl.load(ids_ptr + row)
        if (e < expert_lo) | (e >= expert_hi):
            return
    x_row = x_ptr + row * stride_x
    cols = tl.arange(0, BLOCK)  # [BLOCK]
    if STATIC:
        scale = tl.load(static_ptr).to(tl.float32)
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), amax_floor), 448.0)
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        ok = k0 + cols < K
        x = tl.load(x_row + k0 + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * stride_q + k0 + cols, to_e4m3(x, scale), mask=ok)


def quantize_rows(x: torch.Tensor, static_scale: torch.Tensor | None = None, num_rows: torch.Tensor | None = None,
                  row_experts: tuple[torch.Tensor, int, int] | None = None, pdl: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (contiguous rows) -> (codes fp8 [M, K], scales fp32 [M]); ``static_scale`` (one fp32 element on
    x's device) quantizes every row with it.

    Rows that were never written (other expert-parallel ranks' pairs) can be skipped, left uninitialised in
    the outputs, without a host sync: ``num_rows`` (one element on the device) stops at that row;
    ``row_experts`` = (ids [M], lo, hi) skips row r unless lo <= ids[r] < hi. ``pdl``: KernelConfig.pdl."""
    if x.dim() != 2:
        raise ValueError(f"quantize_rows: expected x [M, K], got {tuple(x.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    m, k = x.shape
    codes = torch.empty(m, k, dtype=FP8, device=x.device)
    scales = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return codes, scales
    if static_scale is not None and static_scale.numel() != 1:
        raise ValueError(f"quantize_rows: a static scale has one element, got shape {tuple(static_scale.shape)}")
    ids, lo, hi = row_experts if row_experts is not None else (scales, 0, 0)
    if row_experts is not None and ids.numel() != m:
        raise ValueError(f"quantize_rows: row_experts holds {ids.numel()} ids for {m} rows")
    block = min(MAX_BLOCK, triton.next_power_of_2(max(k, 16)))
    _quant_rows_kernel[(m,)](
        x, codes, scales, scales if static_scale is None else static_scale, scales if num_rows is None else num_rows,
        ids, k, x.stride(0), codes.stride(0), AMAX_FLOOR, lo, hi, STATIC=static_scale is not None,
        BOUNDED=num_rows is not None, BY_EXPERT=row_experts is not None, BLOCK=block,
        num_warps=4 if block >= 1024 else 1, **pdl_args(x, pdl),
    )
    return codes, scales

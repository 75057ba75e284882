"""W4A16 / W8A16 fused MoE experts in Triton: the bf16 fused MoE's structure (fused_moe.py) with the expert
weights read as integer codes and dequantized in the K loop.

Same contract as ``fused_moe`` (x [N, D], w13 [E, 2F, D], w2 [E, D, F] as canonical int tensors,
topk_weights/topk_ids [N, k]) and the same pieces, imported: the pair layout (``layout_pairs``: decode steps
of a few pairs skip the align launch, larger ones use ``moe_align``'s sorted blocks of ``block_m`` rows, all
of one expert), the split-K partials and the top-k sum (``w2_partials``, ``moe_sum``). Each program takes one
block of rows and one tile of output columns, so only the experts present in the routing have their codes
read: batch-1 decode streams 2 of 8 experts, a quarter (int4) or half (int8) of bf16's bytes. Prefill uses the
same kernels with 64-row blocks: grouped GEMMs whose weight tiles are dequantized once per row block.

w13 and w2 may be in different formats (a GGUF Q4_K_M layer: Q4_K gate/up, Q6_K down); each launch reads its
weight's format from its tensors. Act-order experts gather their input columns through ``perm``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mixtral.kernels.triton.fused_moe import PairLayout, _program_tile, layout_pairs, w2_partials
from mixtral.kernels.triton.int_dequant import IntWeight, dequant_tile
from mixtral.kernels.triton.moe_configs import GemmConfig
from mixtral.kernels.triton.moe_sum import moe_sum
from mixtral.kernels.triton.pdl import pdl_args, pdl_enter
from mixtral.quant.base import QuantTensors


@triton.jit
def _k_columns(perm_ptr, e, stride_pe, k0, offs_k, HAS_PERM: tl.constexpr):
    """The input columns [BK] of the K step at k0: through expert e's act-order permutation when it has one."""
    if HAS_PERM:
        cols = tl.load(perm_ptr + e * stride_pe + k0 + offs_k)
    else:
        cols = k0 + offs_k
    return cols


@triton.jit
def _int_w13_silu_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, act_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_pad_ptr, topk_ids_ptr,
    num_pairs, F, D, expert_start, n_local,
    stride_xm, stride_qe, stride_qn, stride_se, stride_sn, stride_pe, stride_am,
    TOP_K: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, ZERO: tl.constexpr, HAS_PERM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DIRECT: tl.constexpr, IEEE: tl.constexpr,
    PDL: tl.constexpr,
):
    """act[pair, n] = silu(x[token] . w1[e, n]) * (x[token] . w3[e, n]) for one [BLOCK_M, BLOCK_N] tile."""
    pdl_enter(PDL)
    # offs_n [BN]: rows of w1; w3's are F further
    e, pair, row_ok, offs_n, n_ok = _program_tile(sorted_ids_ptr, expert_ids_ptr, num_post_pad_ptr, topk_ids_ptr,
                                                  num_pairs, expert_start, n_local, F, BLOCK_M, BLOCK_N, DIRECT)
    if e < 0:
        return
    token = tl.where(row_ok, pair // TOP_K, 0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + token[:, None] * stride_xm
    qw_e = qw_ptr + e * stride_qe
    s_e = s_ptr + e * stride_se
    z_e = z_ptr + e * stride_se
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        cols = _k_columns(perm_ptr, e, stride_pe, k0, offs_k, HAS_PERM)
        a = tl.load(x_rows + cols[None, :], mask=row_ok[:, None], other=0.0)  # [BM, BK]
        wg = dequant_tile(qw_e, s_e, z_e, offs_n, n_ok, k0, stride_qn, stride_sn, BITS, GROUP, ZERO, BLOCK_K)
        wu = dequant_tile(qw_e, s_e, z_e, offs_n + F, n_ok, k0, stride_qn, stride_sn, BITS, GROUP, ZERO, BLOCK_K)
        wg = wg.to(x_ptr.dtype.element_ty)
        wu = wu.to(x_ptr.dtype.element_ty)
        if IEEE:
            acc_g = tl.dot(a, tl.trans(wg), acc_g, input_precision="ieee")
            acc_u = tl.dot(a, tl.trans(wu), acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(a, tl.trans(wg), acc_g)
            acc_u = tl.dot(a, tl.trans(wu), acc_u)
    act = acc_g * tl.sigmoid(acc_g) * acc_u  # SiLU(gate) * up in fp32
    out_ptrs = act_ptr + pair[:, None].to(tl.int64) * stride_am + offs_n[None, :]
    tl.store(out_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _int_w2_weighted_kernel(
    act_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, out_ptr, topk_weights_ptr, sorted_ids_ptr, expert_ids_ptr,
    num_post_pad_ptr, topk_ids_ptr, num_pairs, D, F, k_per_split, expert_start, n_local,
    stride_am, stride_qe, stride_qn, stride_se, stride_sn, stride_pe, stride_os, stride_om,
    BITS: tl.constexpr, GROUP: tl.constexpr, ZERO: tl.constexpr, HAS_PERM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DIRECT: tl.constexpr, IEEE: tl.constexpr,
    PDL: tl.constexpr,
):
    """out[split, pair, n] = topk_weight[pair] * (act[pair] . w2[e, n]) over this split's slice of F."""
    pdl_enter(PDL)
    pid_k = tl.program_id(2)
    e, pair, row_ok, offs_n, n_ok = _program_tile(sorted_ids_ptr, expert_ids_ptr, num_post_pad_ptr, topk_ids_ptr,
                                                  num_pairs, expert_start, n_local, D, BLOCK_M, BLOCK_N, DIRECT)
    if e < 0:
        return
    pair64 = tl.where(row_ok, pair, 0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = act_ptr + pair64[:, None] * stride_am
    qw_e = qw_ptr + e * stride_qe
    s_e = s_ptr + e * stride_se
    z_e = z_ptr + e * stride_se
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, F), BLOCK_K):
        cols = _k_columns(perm_ptr, e, stride_pe, k0, offs_k, HAS_PERM)
        a = tl.load(a_rows + cols[None, :], mask=row_ok[:, None], other=0.0)  # [BM, BK]
        w = dequant_tile(qw_e, s_e, z_e, offs_n, n_ok, k0, stride_qn, stride_sn, BITS, GROUP, ZERO, BLOCK_K)
        w = w.to(act_ptr.dtype.element_ty)
        if IEEE:
            acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(w), acc)
    weight = tl.load(topk_weights_ptr + pair64, mask=row_ok, other=0.0).to(tl.float32)  # [BM]
    acc = acc * weight[:, None]
    out_ptrs = out_ptr + pid_k * stride_os + pair64[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@dataclass(frozen=True)
class IntMoEConfig:
    """Rows per block and each GEMM's tile (block_k is narrowed to what each weight's groups allow)."""

    block_m: int
    w13: GemmConfig
    w2: GemmConfig


def default_int_config(num_tokens: int) -> IntMoEConfig:
    """Untuned tiles: 16-row blocks and split-K on w2 for decode (weight streaming over few experts), larger
    tiles for prefill."""
    if num_tokens <= 32:
        return IntMoEConfig(16, GemmConfig(64, 128, 4, 4), GemmConfig(64, 128, 4, 4, split_k=2))
    if num_tokens <= 256:
        return IntMoEConfig(32, GemmConfig(64, 64, 4, 4), GemmConfig(64, 64, 4, 4))
    return IntMoEConfig(64, GemmConfig(128, 64, 8, 3), GemmConfig(128, 64, 8, 3))


def _perm_args(w: IntWeight) -> tuple[torch.Tensor, int]:
    perm = w.perm
    return (perm, perm.stride(0)) if perm is not None else (w.scales, 0)


def invoke_int_w13(x: torch.Tensor, w13: IntWeight, act: torch.Tensor, layout: PairLayout, top_k: int, block_m: int,
                   cfg: GemmConfig, pdl: bool = True) -> None:
    """act [N*k, F] = silu(x w1^T) * (x w3^T) per pair, for the pairs of ``layout``."""
    f, d = w13.n // 2, x.shape[1]
    block_k = w13.block_k(cfg.block_k)
    perm, stride_pe = _perm_args(w13)
    _int_w13_silu_kernel[(layout.num_blocks, triton.cdiv(f, cfg.block_n))](
        x, w13.qweight, w13.scales, w13.zero_tensor, perm, act, *layout.kernel_args(),
        act.shape[0], f, d, layout.expert_start, layout.num_local,
        x.stride(0), w13.qweight.stride(0), w13.qweight.stride(1), w13.scales.stride(0), w13.scale_row_stride,
        stride_pe, act.stride(0),
        TOP_K=top_k, BITS=w13.fmt.bits, GROUP=w13.fmt.group_size, ZERO=w13.zero_code, HAS_PERM=w13.perm is not None,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, DIRECT=layout.direct, IEEE=x.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_args(x, pdl),
    )


def invoke_int_w2(act: torch.Tensor, w2: IntWeight, out_partials: torch.Tensor, weights: torch.Tensor,
                  layout: PairLayout, block_m: int, cfg: GemmConfig, pdl: bool = True) -> None:
    """out_partials [split_k, N*k, D] = weight * (act w2^T) per pair and slice of F."""
    d, f = w2.n, w2.k
    block_k = w2.block_k(cfg.block_k)
    k_per_split = triton.cdiv(triton.cdiv(f, cfg.split_k), block_k) * block_k
    perm, stride_pe = _perm_args(w2)
    _int_w2_weighted_kernel[(layout.num_blocks, triton.cdiv(d, cfg.block_n), cfg.split_k)](
        act, w2.qweight, w2.scales, w2.zero_tensor, perm, out_partials, weights, *layout.kernel_args(),
        act.shape[0], d, f, k_per_split, layout.expert_start, layout.num_local,
        act.stride(0), w2.qweight.stride(0), w2.qweight.stride(1), w2.scales.stride(0), w2.scale_row_stride,
        stride_pe, out_partials.stride(0), out_partials.stride(1),
        BITS=w2.fmt.bits, GROUP=w2.fmt.group_size, ZERO=w2.zero_code, HAS_PERM=w2.perm is not None,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, DIRECT=layout.direct, IEEE=act.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_args(act, pdl),
    )


def int_fused_moe(x: torch.Tensor, w13: QuantTensors, w2: QuantTensors, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, expert_start: int = 0, config: IntMoEConfig | None = None,
                  direct: bool | None = None, pdl: bool = True) -> torch.Tensor:
    """x [N, D]; w13 canonical int [E, 2F, D]; w2 canonical int [E, D, F]; topk_weights [N, k] fp32; topk_ids
    [N, k] global ids -> [N, D] in x's dtype: sum over each token's local experts of weight * w2(silu(w1 x) * w3 x).
    """
    a, b = IntWeight.of(w13), IntWeight.of(w2)
    n, d = x.shape
    if a.qweight.dim() != 3 or b.qweight.dim() != 3 or a.k != d or b.n != d or a.n != 2 * b.k:
        raise ValueError(f"int_fused_moe: x {tuple(x.shape)}, w13 [E, {a.n}, {a.k}] and w2 [E, {b.n}, {b.k}] do not "
                         "fit x [N, D], w13 [E, 2F, D], w2 [E, D, F]")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != n:
        raise ValueError(f"int_fused_moe: topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [N={n}, k]")
    if n == 0:
        return x.new_zeros(n, d)
    e_local, f, top_k = a.qweight.shape[0], b.k, topk_ids.shape[1]
    cfg = config or default_int_config(n)
    x = x if x.stride(-1) == 1 else x.contiguous()
    weights = topk_weights.reshape(-1).float().contiguous()  # [N*k] fp32
    layout = layout_pairs(topk_ids, e_local, cfg.block_m, expert_start, direct, pdl)
    act = torch.empty(n * top_k, f, dtype=x.dtype, device=x.device)  # [N*k, F] by pair
    invoke_int_w13(x, a, act, layout, top_k, cfg.block_m, cfg.w13, pdl)
    partials = w2_partials(n * top_k, d, cfg.w2, x.dtype, x.device)  # [S, N*k, D]
    invoke_int_w2(act, b, partials, weights, layout, cfg.block_m, cfg.w2, pdl)
    return moe_sum(partials, topk_ids, expert_start, e_local, x.dtype, pdl)

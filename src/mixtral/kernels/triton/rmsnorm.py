"""RMSNorm, alone or fused with the residual add before it (Triton): one kernel instead of ~8 elementwise ones.

Same math and rounding order as ``reference.rms_norm_reference`` (model/layers.py's RMSNorm):
``weight * (xf * rsqrt(mean(xf^2) + eps)).to(x.dtype)`` with ``xf = x.float()``; the weight product is done
in fp32 and rounded once to the promoted dtype, which is what PyTorch's mixed elementwise multiply does.
``add_rms_norm`` first forms ``x + residual`` rounded to the dtype (as ``h = x + attn_out`` does) and
normalises that rounded sum. Only the fp32 sum of squares differs from PyTorch (another reduction order).

One program per row holds the whole row in registers (D up to 16384 here); the launch grid depends only on
shapes, so the kernels are CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixtral.kernels.triton.pdl import pdl_args, pdl_enter

MAX_DIM = 16384  # one row per program, in registers


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr,
    stride_x, stride_r, stride_o, stride_s,
    dim, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    offs = tl.arange(0, BLOCK_D)  # [BD]
    mask = offs < dim
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)  # a constant weight: read before the PDL wait
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)  # [BD] in x's dtype
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        # Add in fp32 and round to the dtype, as PyTorch's x + residual does; the norm sees the rounded sum.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_s + offs, x, mask=mask)
    xf = x.to(tl.float32)
    mean_sq = tl.sum(xf * xf, axis=0) / dim
    y = (xf * tl.rsqrt(mean_sq + eps)).to(x_ptr.dtype.element_ty)  # normalised, rounded to x's dtype
    out = (w.to(tl.float32) * y.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + offs, out, mask=mask)


def _rows(x: torch.Tensor, dim: int) -> torch.Tensor:
    """[..., D] -> [N, D] with unit stride along D (a view when possible)."""
    x2 = x.reshape(-1, dim)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, pdl: bool
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    dim = x.shape[-1]
    if weight.shape != (dim,):
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match the last dim {dim} of x")
    if dim > MAX_DIM:
        raise ValueError(f"rms_norm: dim {dim} exceeds the {MAX_DIM} one-row-per-program limit")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)} {residual.dtype} must match "
                         f"x {tuple(x.shape)} {x.dtype}")
    x2 = _rows(x, dim)  # [N, D]
    n = x2.shape[0]
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    out2 = out.view(-1, dim)
    if residual is not None:
        r2 = _rows(residual, dim)
        summed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        s2 = summed.view(-1, dim)
    else:
        r2, summed, s2 = x2, None, out2  # unused by the kernel when HAS_RESIDUAL is False
    if n == 0:
        return out, summed
    block_d = triton.next_power_of_2(dim)
    _rms_norm_kernel[(n,)](
        x2, r2, weight if weight.stride(0) == 1 else weight.contiguous(), out2, s2,
        x2.stride(0), r2.stride(0), out2.stride(0), s2.stride(0),
        dim, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_D=block_d,
        num_warps=min(max(block_d // 512, 1), 16), **pdl_args(x2, pdl),
    )
    return out, summed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, pdl: bool = True) -> torch.Tensor:
    """x [..., D], weight [D] -> weight * normalised x [..., D] (dtype: promote(weight, x))."""
    return _launch(x, None, weight, eps, pdl)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, pdl: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [..., D] (same dtype) -> (rms_norm(x + residual), x + residual), the sum in x's dtype."""
    out, summed = _launch(x, residual, weight, eps, pdl)
    assert summed is not None
    return out, summed

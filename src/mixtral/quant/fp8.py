"""FP8 (e4m3) weights with per-output-channel scales, activations quantized per token: the ``fp8`` scheme.

Stored tensors of a logical weight ``[*lead, out, in]`` (``lead`` = ``(E,)`` for experts, one scale set per
expert): ``weight`` float8_e4m3fn ``[*lead, out, in]``, ``weight_scale`` fp32 ``[*lead, out]`` and, for
checkpoints with static activation scales, ``input_scale`` fp32 ``[*lead]``. Logical weight = weight *
weight_scale[..., None].

What a multiplication computes (the same on every path; this module holds the PyTorch form, which runs
anywhere and is what the Triton kernels in kernels/triton/fp8_*.py are held to):
1. each row (token) of x is quantized on the fly: scale = max|x_row| / 448 (or the static input scale),
   codes = fp8(clamp(x / scale)) rounded to nearest even;
2. y[m, n] = scale_x[m] * scale_w[n] * sum_k codes_x[m, k] * codes_w[n, k], summed in fp32, rounded once to
   x's dtype. In the MoE the SiLU product is rounded to x's dtype, then quantized per row the same way
   before w2.
``dequantize`` then a matmul in the activation dtype is the weight-only reference (no activation rounding);
tests bound the gap between the two.

Static input scales (compressed-tensors / AutoFP8 "static"): a fused weight keeps one scale, the largest of
its pieces' (q/k/v, or the experts of one layer), as vLLM does: a larger scale never overflows a piece.

Not here: checkpoint layouts (checkpoint/fp8_formats.py), kernel launch shapes (kernels/triton/fp8_*.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixtral.quant.base import QuantMethod, QuantSpec, QuantTensors, StoredTensor

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
# A row whose largest magnitude is below this (all zeros: padding) gets this scale instead of 0 (no 0 / 0).
AMAX_FLOOR = 1e-12


# --------------------------------------------------------------------------- the numerics
def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """Largest magnitude -> the fp32 scale that maps it to 448: an IEEE fp32 division (round to nearest), the
    kernels' ``div_rn``. Divided by a 448 on amax's device, not by the Python float: PyTorch's CUDA division by a
    CPU scalar multiplies by the scalar's fp32 reciprocal instead, one ulp off the quotient for some amax
    (the CPU divides either way)."""
    amax = amax.float().clamp(min=AMAX_FLOOR)
    return amax / torch.full((), FP8_MAX, dtype=torch.float32, device=amax.device)


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale (broadcast), saturated to +-448, rounded to nearest even e4m3 codes."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [*lead, out, in] -> (codes fp8 [*lead, out, in], scales fp32 [*lead, out]): one scale per output row."""
    scale = scale_from_amax(w.float().abs().amax(dim=-1))  # [*lead, out]
    return to_fp8(w, scale[..., None]), scale


def quantize_rows(x: torch.Tensor, static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations x [M, K] -> (codes fp8 [M, K], scales fp32 [M]): per row (token), or every row with the one
    ``static_scale`` (a checkpoint's input scale, one element)."""
    if static_scale is None:
        scale = scale_from_amax(x.float().abs().amax(dim=-1))  # [M]
    else:
        scale = static_scale.float().reshape(1).expand(x.shape[0])  # [M]
    return to_fp8(x, scale[:, None]), scale.contiguous()


def scaled_mm(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """codes xq [M, K], x_scale [M], wq [N, K], w_scale [N] -> fp32 [M, N]: the fp32 sum of code products,
    scaled by the row's and the column's scale."""
    acc = xq.float() @ wq.float().T  # [M, N] exact products, fp32 sums
    return acc * x_scale[:, None] * w_scale[None, :]


def qlinear_reference(x: torch.Tensor, t: QuantTensors) -> torch.Tensor:
    """x [M, in] -> [M, out] in x's dtype, the quantized computation (per-token activation codes)."""
    xq, xs = quantize_rows(x, t.get("input_scale"))
    return scaled_mm(xq, xs, t["weight"], t["weight_scale"]).to(x.dtype)


def qmoe_reference(x: torch.Tensor, w13: QuantTensors, w2: QuantTensors, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, expert_start: int = 0) -> torch.Tensor:
    """The experts in FP8, one expert at a time (the structure of ``reference.moe_reference``): x [N, D],
    w13 codes [E, 2F, D], w2 codes [E, D, F], topk_weights [N, k] fp32, topk_ids [N, k] global ids -> [N, D]."""
    xq, xs = quantize_rows(x, w13.get("input_scale"))  # per token, shared by every expert
    out = torch.zeros_like(x)
    for local in range(w13["weight"].shape[0]):
        token_idx, slot = torch.where(topk_ids == expert_start + local)  # [n], [n]
        if token_idx.numel() == 0:
            continue
        h = scaled_mm(xq[token_idx], xs[token_idx], w13["weight"][local], w13["weight_scale"][local])  # [n, 2F]
        gate, up = h.chunk(2, dim=-1)
        act = (F.silu(gate) * up).to(x.dtype)  # [n, F] rounded as the kernels store it
        aq, a_scale = quantize_rows(act, w2.get("input_scale"))
        y = scaled_mm(aq, a_scale, w2["weight"][local], w2["weight_scale"][local])  # [n, D] fp32
        y = y * topk_weights[token_idx, slot, None]
        out.index_add_(0, token_idx, y.to(x.dtype))
    return out


# --------------------------------------------------------------------------- the method
class Fp8Method(QuantMethod):
    """The ``fp8`` scheme (see the module docstring). ``spec.static_input_scale`` adds ``input_scale``."""

    name = "fp8"

    def __init__(self, spec: QuantSpec | None = None) -> None:
        self.spec = spec or QuantSpec(method="fp8")
        if self.spec.method != "fp8":
            raise ValueError(f"Fp8Method serves method 'fp8', got a spec for {self.spec.method!r}")
        self.static = self.spec.static_input_scale

    def stored(self) -> list[StoredTensor]:
        tensors = [StoredTensor("weight", FP8, 1, 1), StoredTensor("weight_scale", torch.float32, 1, 0)]
        if self.static:
            tensors.append(StoredTensor("input_scale", torch.float32, 0, 0))
        return tensors

    def quantize(self, w: torch.Tensor) -> QuantTensors:
        if self.static:
            raise ValueError("static FP8 input scales come from a calibrated checkpoint; quantizing bf16 weights "
                             "here gives dynamic (per-token) activation scales")
        codes, scale = quantize_weight(w)
        return {"weight": codes, "weight_scale": scale}

    def dequantize(self, t: QuantTensors, dtype: torch.dtype) -> torch.Tensor:
        return (t["weight"].float() * t["weight_scale"].float()[..., None]).to(dtype)

    def process_after_loading(self, t: QuantTensors, act_dtype: torch.dtype | None = None,
                              cpu_kernel: str = "auto") -> QuantTensors:
        """Contiguous codes and fp32 scales; a static input scale becomes the largest of the weight's pieces
        (one element), the scale every piece's activations are quantized with. ``act_dtype`` and
        ``cpu_kernel`` (the int scheme's extensions of the seam) change nothing here: the scales stay fp32 for
        every activation dtype."""
        out = {"weight": t["weight"].contiguous(), "weight_scale": t["weight_scale"].float().contiguous()}
        if self.static:
            out["input_scale"] = t["input_scale"].float().amax().reshape(1)
        return out

    def reference_linear(self, x: torch.Tensor, t: QuantTensors) -> torch.Tensor:
        return qlinear_reference(x, t)

    def reference_moe(self, x: torch.Tensor, w13: QuantTensors, w2: QuantTensors, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor, expert_start: int = 0) -> torch.Tensor:
        return qmoe_reference(x, w13, w2, topk_weights, topk_ids, expert_start)

    def triton_linear(self, x: torch.Tensor, t: QuantTensors, pdl: bool = True) -> torch.Tensor:
        from mixtral.kernels.triton.fp8_gemm import fp8_linear

        return fp8_linear(x, t["weight"], t["weight_scale"], t.get("input_scale"), pdl=pdl)

    def triton_moe(self, x: torch.Tensor, w13: QuantTensors, w2: QuantTensors, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, expert_start: int = 0, pdl: bool = True) -> torch.Tensor:
        from mixtral.kernels.triton.fp8_moe import fp8_moe

        return fp8_moe(x, w13, w2, topk_weights, topk_ids, expert_start, pdl=pdl)

"""Which FP8 experts path a step takes: the prefill grouped GEMMs (``fp8_sorted_moe``) from
``ops.SORTED_MIN_TOKENS`` tokens on sm90+ where the shapes fit their tiles, the decode kernel
(``fp8_fused_moe``, which reads only the experts hit) otherwise. The same split as ``ops.fused_moe`` makes
for bf16; the FP8 crossover is to be measured (tests/gpu/test_fp8_kernels.py times both at 1024 tokens).
"""

from __future__ import annotations

import torch

from mixtral.kernels.triton.fp8_fused_moe import fp8_fused_moe
from mixtral.kernels.triton.fp8_sorted_moe import default_fp8_sorted_config, fp8_layout_problem, fp8_sorted_moe
from mixtral.quant.base import QuantTensors


def takes_sorted(x: torch.Tensor, w13: torch.Tensor) -> bool:
    """Whether a step of x [N, D] runs the prefill GEMMs: enough tokens, a Hopper-class GPU, shapes that fit."""
    from mixtral.kernels.dispatch import SORTED_MIN_TOKENS, _sm90

    if x.shape[0] < SORTED_MIN_TOKENS or not x.is_cuda or not _sm90(x.device):
        return False
    return fp8_layout_problem(x.shape[1], w13.shape[1] // 2, default_fp8_sorted_config()) is None


def fp8_moe(x: torch.Tensor, w13: QuantTensors, w2: QuantTensors, topk_weights: torch.Tensor,
            topk_ids: torch.Tensor, expert_start: int = 0, pdl: bool = True) -> torch.Tensor:
    """``Fp8Method.moe`` on CUDA: x [N, D], the experts' stored FP8 tensors (``weight``, ``weight_scale``,
    optional ``input_scale``) -> [N, D] in x's dtype; ``pdl``: KernelConfig.pdl."""
    path = fp8_sorted_moe if takes_sorted(x, w13["weight"]) else fp8_fused_moe
    return path(x, w13["weight"], w13["weight_scale"], w2["weight"], w2["weight_scale"], topk_weights, topk_ids,
                expert_start, w13.get("input_scale"), w2.get("input_scale"), pdl=pdl)

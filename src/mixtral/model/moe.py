"""The sparse MoE feed-forward: a router and E SwiGLU experts stored stacked.

Weights: ``gate`` [E, D] (a bias-free Linear), ``w13`` [E_local, 2F, D] (w1 rows, then w3 rows: one GEMM
gives gate and up), ``w2`` [E_local, D, F]. Expert parallelism gives each rank a contiguous range of
experts (``expert_start``); tensor parallelism shards F. Either way the ranks' outputs are summed.

Three interchangeable PyTorch paths compute the experts, and a test holds them equal:
- ``reference``: one expert at a time over the tokens routed to it (kernels/reference.py);
- ``grouped``: token/expert pairs sorted by expert, one GEMM per contiguous group (good at large N);
- ``gather``: each pair gathers its expert's weights (reads only the chosen experts: batch 1-4 decode).
- ``triton``: the fused GPU kernel (kernels/ops.py dispatch); the engine picks it on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mixtral.kernels import ops
from mixtral.kernels.grouped_mm_moe import grouped_mm_moe
from mixtral.kernels.reference import moe_reference
from mixtral.model.args import ModelArgs
from mixtral.model.context import routing_counter

# (x [N, D], w13, w2, topk_weights [N, k], topk_ids [N, k], expert_start) -> [N, D]
ExpertsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def moe_grouped(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor, expert_start: int = 0) -> torch.Tensor:
    """Sort the N*k (token, expert) pairs by expert and run each expert once on its contiguous group."""
    k = topk_ids.shape[1]
    e_local = w13.shape[0]
    flat_ids = topk_ids.reshape(-1) - expert_start  # [N*k] local ids; out of range = other rank
    order = torch.argsort(flat_ids, stable=True)  # [N*k]
    sorted_ids = flat_ids[order]
    token_of_pair = order // k  # [N*k] which token each sorted pair belongs to
    counts = torch.bincount(sorted_ids.clamp(0, e_local).masked_fill(sorted_ids < 0, e_local),
                            minlength=e_local + 1)[:e_local].tolist()
    first_local = int((sorted_ids < 0).sum())
    xs = x[token_of_pair]  # [N*k, D] rows in expert order
    ys = torch.zeros_like(xs)
    start = first_local
    for e, c in enumerate(counts):
        if c:
            seg = xs[start:start + c]
            gate, up = F.linear(seg, w13[e]).chunk(2, dim=-1)  # [c, F]
            ys[start:start + c] = F.linear(F.silu(gate) * up, w2[e])
            start += c
    w = topk_weights.reshape(-1)[order]  # [N*k] fp32
    out = torch.zeros_like(x)
    out.index_add_(0, token_of_pair, (ys * w[:, None]).to(x.dtype))
    return out


def moe_gather(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
               topk_ids: torch.Tensor, expert_start: int = 0) -> torch.Tensor:
    """Each (token, expert) pair reads its own expert's weights: cost scales with N*k, not with E."""
    local = topk_ids - expert_start  # [N, k]
    valid = (local >= 0) & (local < w13.shape[0])
    local = local.clamp(0, w13.shape[0] - 1)
    w13_sel = w13[local]  # [N, k, 2F, D]
    w2_sel = w2[local]  # [N, k, D, F]
    gate_up = torch.einsum("nd,nkfd->nkf", x, w13_sel)  # [N, k, 2F]
    gate, up = gate_up.chunk(2, dim=-1)
    y = torch.einsum("nkf,nkdf->nkd", F.silu(gate) * up, w2_sel)  # [N, k, D]
    w = (topk_weights * valid).unsqueeze(-1)  # [N, k, 1] fp32; zero for other ranks' experts
    return (y * w).to(x.dtype).sum(dim=1)


EXPERT_PATHS: dict[str, ExpertsFn] = {
    "reference": moe_reference,
    "grouped": moe_grouped,
    "gather": moe_gather,
    # The fused Triton kernel on CUDA (kernels/triton/fused_moe.py), the reference elsewhere.
    "triton": ops.fused_moe,
    # Two CUTLASS grouped GEMMs via torch._grouped_mm (kernels/grouped_mm_moe.py): prefill-sized batches.
    "grouped_mm": grouped_mm_moe,
}


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int, ep_rank: int = 0, ep_size: int = 1,
                 tp_size: int = 1) -> None:
        super().__init__()
        if args.num_experts % ep_size:
            raise ValueError(f"expert-parallel size {ep_size} must divide num_experts ({args.num_experts})")
        if args.hidden_dim % tp_size:
            raise ValueError(f"tensor-parallel size {tp_size} must divide hidden_dim ({args.hidden_dim})")
        self.layer_idx = layer_idx
        self.num_experts = args.num_experts
        self.top_k = args.num_experts_per_tok
        e_local = args.num_experts // ep_size
        f_local = args.hidden_dim // tp_size
        self.expert_start = ep_rank * e_local
        self.gate = nn.Linear(args.dim, args.num_experts, bias=False)
        self.w13 = nn.Parameter(torch.empty(e_local, 2 * f_local, args.dim))
        self.w2 = nn.Parameter(torch.empty(e_local, args.dim, f_local))
        # Router jitter (training only): multiply inputs by U(1 - j, 1 + j) before routing, as transformers.
        self.jitter = 0.0
        self.experts_fn: ExpertsFn = moe_grouped

    def forward(self, x: torch.Tensor, ctx: object = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (out [N, D], router_logits [N, E] in model dtype, for the aux loss)."""
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        # [N, E] logits, [N, k] fp32 weights, [N, k] int64 ids; the context's expert counts updated on the way
        # (one kernel on CUDA at decode sizes: ops.gate_route).
        counts, mask = routing_counter(ctx, self.layer_idx) if ctx is not None else (None, None)
        router_logits, topk_weights, topk_ids = ops.gate_route(x, self.gate.weight, self.top_k, counts, mask)
        out = self.experts_fn(x, self.w13, self.w2, topk_weights, topk_ids, self.expert_start)
        return out, router_logits

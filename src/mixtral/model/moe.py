"""The sparse MoE feed-forward: a router and E SwiGLU experts stored stacked.

Weights: ``gate`` [E, D] (a bias-free Linear), ``w13`` [E_local, 2F, D] (w1 rows, then w3 rows: one GEMM
gives gate and up), ``w2`` [E_local, D, F]. Expert parallelism gives each rank a contiguous range of
experts (``expert_start``); tensor parallelism shards F. Either way the ranks' outputs are summed.

The layer computes nothing itself: ``self.kernels`` (``kernels/dispatch.Kernels``, set once by the model from
its ``KernelConfig``) routes (``gate_route``) and runs the experts (``moe_experts``), which is one of:
- the Triton decode kernel (kernels/triton/fused_moe.py): CUDA, decode to mid-sized batches, CUDA graphs;
- the Triton sorted-row GEMMs (kernels/triton/sorted_moe.py): CUDA sm90+, prefill-sized token counts;
- the grouped PyTorch path (kernels/moe_grouped.py): CPU, and training (autograd);
- the reference (kernels/reference.py ``moe_reference``): the ground truth, with ``backend='reference'``.
Tests hold each of them to the reference. Quantized experts (``w13`` and ``w2`` swapped for ``QuantWeight``
modules, model/quantized.py, ``quantized`` set) run through ``kernels.quant_moe`` with the weights' method.

Routing capture: a context with a ``routing_capture`` (the engine's, engine/routing.py, set only on steps where a
request asked for its routing) is handed each layer's top-k ids and weights, the tensors the experts run with.
"""

from __future__ import annotations

import torch
from torch import nn

from mixtral.kernels.dispatch import Kernels, default_kernels
from mixtral.model.args import ModelArgs
from mixtral.model.context import routing_counter


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
        self.kernels: Kernels = default_kernels()
        self.quantized = False  # w13 / w2 are QuantWeight modules (model/quantized.py)

    def forward(self, x: torch.Tensor, ctx: object = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (out [N, D], router_logits [N, E] in model dtype, for the aux loss)."""
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        # [N, E] logits, [N, k] fp32 weights, [N, k] int64 ids; the context's expert counts updated on the way
        # (one kernel on CUDA at decode sizes: Kernels.gate_route).
        counts, mask = routing_counter(ctx, self.layer_idx) if ctx is not None else (None, None)
        router_logits, topk_weights, topk_ids = self.kernels.gate_route(x, self.gate.weight, self.top_k, counts,
                                                                        mask)
        capture = getattr(ctx, "routing_capture", None)
        if capture is not None:
            capture.record(self.layer_idx, topk_ids, topk_weights)
        if self.quantized:
            w13, w2 = self.w13, self.w2
            out = self.kernels.quant_moe(w13.method, x, w13.tensors, w2.tensors, topk_weights, topk_ids,
                                         self.expert_start)
        else:
            out = self.kernels.moe_experts(x, self.w13, self.w2, topk_weights, topk_ids, self.expert_start)
        return out, router_logits

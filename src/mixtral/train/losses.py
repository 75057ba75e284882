"""Training losses for Mixtral: masked next-token loss, the router load-balancing loss, router z-loss.

The load-balancing loss is the one Hugging Face transformers adds to Mixtral's LM loss
(``load_balancing_loss_func``, Switch Transformer eqs. 4-6), written from its definition:
over all layers' router logits (rows = tokens, columns = experts), with P = softmax(logits),
f_e = (times expert e is in a token's top-k) / rows and p_e = mean of P[:, e],
``loss = E * sum_e f_e * p_e`` (k when perfectly balanced). Padding rows are left out of both means.
This module computes losses only; the trainer decides their coefficients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _stack_layers(router_logits: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """A list of L tensors [N, E] (or one [L, N, E]) -> fp32 [L, N, E]."""
    if isinstance(router_logits, torch.Tensor):
        stacked = router_logits if router_logits.dim() == 3 else router_logits.unsqueeze(0)
    else:
        if len(router_logits) == 0:
            raise ValueError("router_logits is empty: run the model with router_logits=[] to collect them")
        shapes = {tuple(t.shape) for t in router_logits}
        if len(shapes) != 1:
            raise ValueError(f"every layer's router logits must have the same shape [N, E], got {sorted(shapes)}")
        stacked = torch.stack(list(router_logits))
    if stacked.dim() != 3:
        raise ValueError(f"router logits must be [N, E] per layer, got shape {tuple(stacked.shape)}")
    return stacked.float()


def _row_weights(mask: torch.Tensor | None, n_rows: int, device: torch.device) -> torch.Tensor:
    """attention mask [B, T] (or [N]; 1 = real token) -> fp32 [N] row weights, all ones without a mask."""
    if mask is None:
        return torch.ones(n_rows, device=device)
    flat = mask.reshape(-1).to(device=device, dtype=torch.float32)
    if flat.numel() != n_rows:
        raise ValueError(f"attention mask has {flat.numel()} entries but the router saw {n_rows} tokens per layer")
    return flat


def load_balancing_loss(router_logits: Sequence[torch.Tensor] | torch.Tensor, num_experts: int, top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mixtral's auxiliary load-balancing loss, equal to transformers' ``load_balancing_loss_func``.

    router_logits: one [N, E] tensor per layer (N = B*T tokens, row-major like ``input_ids`` [B, T]);
    attention_mask: [B, T] with 1 for real tokens, 0 for padding (optional). Returns a scalar fp32 tensor.
    """
    logits = _stack_layers(router_logits)  # [L, N, E]
    if logits.shape[-1] != num_experts:
        raise ValueError(f"router logits have {logits.shape[-1]} experts, expected num_experts={num_experts}")
    if not 0 < top_k <= num_experts:
        raise ValueError(f"top_k must be in 1..{num_experts}, got {top_k}")
    n_layers, n_rows, _ = logits.shape
    w = _row_weights(attention_mask, n_rows, logits.device)  # [N]
    probs = torch.softmax(logits, dim=-1)  # [L, N, E]
    chosen = torch.topk(probs, top_k, dim=-1).indices  # [L, N, k]
    # Summing the one-hot over k counts each expert once per time it is chosen: f_e sums to k over e.
    hits = F.one_hot(chosen, num_experts).sum(dim=2).float()  # [L, N, E]
    total = w.sum() * n_layers  # rows counted over all layers, padding excluded
    tokens_per_expert = (hits * w[None, :, None]).sum(dim=(0, 1)) / total  # [E]
    prob_per_expert = (probs * w[None, :, None]).sum(dim=(0, 1)) / total  # [E]
    return num_experts * torch.sum(tokens_per_expert * prob_per_expert)


def router_z_loss(router_logits: Sequence[torch.Tensor] | torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over real tokens and layers of logsumexp(router logits)^2.

    Penalises large router logits, which keeps the fp32 softmax of the router well conditioned.
    """
    logits = _stack_layers(router_logits)  # [L, N, E]
    n_layers, n_rows, _ = logits.shape
    w = _row_weights(attention_mask, n_rows, logits.device)  # [N]
    z = torch.logsumexp(logits, dim=-1).pow(2)  # [L, N]
    return (z * w[None, :]).sum() / (w.sum() * n_layers).clamp_min(1.0)


def expert_load(router_logits: Sequence[torch.Tensor] | torch.Tensor, top_k: int,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Routing counts per layer: [L, E] fp32, how many real tokens chose each expert (top-k of the softmax)."""
    logits = _stack_layers(router_logits).detach()  # [L, N, E]
    _, n_rows, n_experts = logits.shape
    w = _row_weights(attention_mask, n_rows, logits.device)  # [N]
    chosen = torch.topk(logits, top_k, dim=-1).indices  # [L, N, k]; softmax is monotonic
    hits = F.one_hot(chosen, n_experts).sum(dim=2).float()  # [L, N, E]
    return (hits * w[None, :, None]).sum(dim=1)  # [L, E]


def masked_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [M, V] against targets [M] (rows already restricted to trained tokens)."""
    if logits.shape[0] == 0:
        # A batch with no trained tokens still needs a graph-connected zero for backward().
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), targets)

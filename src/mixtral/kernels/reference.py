"""Pure-PyTorch ground truth for the fused ops. Readable first; every fast path is tested against these.

Runs anywhere PyTorch runs (CPU included). Nothing here is tuned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route_topk(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral routing: softmax in fp32 over all experts, top-k, renormalise the k to sum to 1.

    router_logits [N, E] -> (weights [N, k] fp32, ids [N, k] int64).
    """
    probs = torch.softmax(router_logits.float(), dim=-1)  # [N, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [N, k]
    return weights / weights.sum(dim=-1, keepdim=True), ids


def count_choices(counts: torch.Tensor, topk_ids: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """counts [E] += how often each expert appears in topk_ids [N, k], rows with mask [N] == 0 left out (the
    expert-utilisation counts; the fused router does the same with atomics)."""
    if mask is None:
        weights = torch.ones(topk_ids.numel(), dtype=counts.dtype, device=counts.device)  # [N*k]
    else:
        weights = mask.to(counts.dtype)[:, None].expand(topk_ids.shape).reshape(-1)  # [N*k]
    counts.index_add_(0, topk_ids.reshape(-1), weights)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: normalise in fp32, cast back to x's dtype, then scale by weight (the order
    transformers and Mistral use). x [..., D], weight [D] -> [..., D] in promote(weight, x) dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add then the next norm: (rms_norm(x + residual), x + residual), the sum in x's dtype."""
    h = x + residual
    return rms_norm_reference(h, weight, eps), h


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, "rotate_half" layout: pairs (i, i + hd/2) rotate together.

    x [N, heads, hd], cos/sin [N, hd] -> [N, heads, hd]; computed in the inputs' dtype (three roundings).
    """
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def rope_qk_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, H, hd], k [N, KV, hd], cos/sin [N, hd] -> rotated (q, k)."""
    return rope_reference(q, cos, sin), rope_reference(k, cos, sin)


def expert_ffn(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert. x [n, D], w13 [2F, D] (w1 rows then w3 rows), w2 [D, F] -> [n, D]."""
    gate, up = F.linear(x, w13).chunk(2, dim=-1)  # [n, F] each
    return F.linear(F.silu(gate) * up, w2)


def moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, expert_start: int = 0) -> torch.Tensor:
    """Sum over each token's chosen experts of weight * expert(x), one expert at a time.

    x [N, D]; w13 [E_local, 2F, D]; w2 [E_local, D, F]; topk_weights [N, k] (fp32); topk_ids [N, k] global
    expert ids. Experts outside [expert_start, expert_start + E_local) live on another rank and add nothing
    here (expert parallelism sums the ranks' outputs).
    """
    out = torch.zeros_like(x)
    for local in range(w13.shape[0]):
        token_idx, slot = torch.where(topk_ids == expert_start + local)  # [n], [n]
        if token_idx.numel() == 0:
            continue
        y = expert_ffn(x[token_idx], w13[local], w2[local])  # [n, D]
        y = y * topk_weights[token_idx, slot, None]  # fp32 weight, as transformers applies it
        out.index_add_(0, token_idx, y.to(x.dtype))
    return out


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, context_lens: torch.Tensor,
                              query_start_loc: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention of ragged queries over K/V stored in paged blocks.

    q [Nq, H, hd]: the new tokens of every sequence, concatenated; sequence i owns rows
    query_start_loc[i]:query_start_loc[i+1]. k_cache/v_cache [num_blocks, block_size, KV, hd] already hold
    every token of each sequence (the new ones included). block_tables [S, max_blocks] maps a sequence's
    logical block j to a physical block; context_lens [S] is each sequence's total length. The new tokens
    are the last ones of their sequence, so query row r of sequence i sits at position
    context_lens[i] - n_i + r and sees keys 0..that position.

    Example: block_size 4, sequence with context_len 6 and block table [7, 2]: its tokens 0-3 are in block 7,
    tokens 4-5 in block 2 slots 0-1.
    """
    num_seqs = block_tables.shape[0]
    block_size = k_cache.shape[1]
    n_heads, n_kv = q.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = context_lens.tolist()
    for i in range(num_seqs):
        q_i = q[starts[i]:starts[i + 1]]  # [n, H, hd]
        n, total = q_i.shape[0], lens[i]
        if n == 0:
            continue
        nblocks = (total + block_size - 1) // block_size
        blocks = block_tables[i, :nblocks]
        k_i = k_cache[blocks].reshape(-1, n_kv, k_cache.shape[-1])[:total]  # [total, KV, hd]
        v_i = v_cache[blocks].reshape(-1, n_kv, v_cache.shape[-1])[:total]
        qpos = torch.arange(total - n, total, device=q.device)[:, None]
        kpos = torch.arange(total, device=q.device)[None, :]
        mask = kpos <= qpos  # [n, total]
        if sliding_window is not None:
            mask &= kpos > qpos - sliding_window
        o = F.scaled_dot_product_attention(
            q_i.transpose(0, 1), k_i.transpose(0, 1), v_i.transpose(0, 1), attn_mask=mask,
            enable_gqa=n_heads != n_kv, scale=q.shape[-1] ** -0.5,
        )  # [H, n, hd]
        out[starts[i]:starts[i + 1]] = o.transpose(0, 1)
    return out


def write_kv_reference(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """Store new K/V rows into their slots. k/v [N, KV, hd]; slot = block * block_size + offset; -1 skips.

    Example: block_size 16, slot 35 -> block 2, offset 3.
    """
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[valid].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[valid].to(v_cache.dtype)

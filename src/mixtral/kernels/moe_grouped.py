"""The MoE experts in plain PyTorch for where the Triton kernels do not run: CPU inference, and training
(autograd records it; the Triton kernels have no backward).

Same contract as ``reference.moe_reference``: x [N, D], w13 [E_local, 2F, D] (w1 rows then w3 rows),
w2 [E_local, D, F], topk_weights [N, k] fp32, topk_ids [N, k] global ids; pairs whose expert lives on another
expert-parallel rank add nothing. The (token, expert) pairs are sorted by expert and each expert runs once, as
two GEMMs, on its contiguous group of rows.

Why this one and no other CPU path: measured on this project's 2-core CPU host in fp32 (2 threads, medians of
interleaved runs, the tiny preset D=64 F=128 and the demo model D=192 F=320, 8 experts, top-2), against the
reference (a ``torch.where`` per expert) and a gather path (each pair reads its own expert's weights):

    tokens          1      8     32    128    512   2048
    tiny  grouped   61    152    204    268    634   1924 us
          reference 67    207    275    336    734  10100
          gather    53    118    385      -      -      -   (11 ms at 256, 61 ms at 1024)
    demo  grouped   85    659    728   1061   7115  21641
          reference 88    769   1221   1035   7234  22714
          gather   118   1261  12058      -      -      -

Grouped is the fastest or level at every size but a tiny decode batch of 1-8 tokens, where gather saves
10-40 us and then falls off a cliff (it copies every pair's expert weights); forward + backward (training)
grouped and the reference were level. One path, fast at decode and prefill sizes alike, is this one; the
reference stays the ground truth (``KernelConfig.backend == "reference"``).

A single token (batch-1 decode) skips the sort, bincount, gather and scatter: its k experts come from one
``tolist`` of its ids and their outputs are summed directly; at that size what costs is the number of PyTorch
calls, not the arithmetic (demo model shapes, one thread, CPU time of the experts of one layer: bf16 139 -> 98 us,
packed int4 80 -> 51 us). From 4 tokens grouping on the host loses to the sort (int4 at 4 / 16 / 64 tokens: 211
/ 332 / 590 us against 165 / 259 / 492: a gather and a scatter per expert instead of one each), so it is kept to
one token. Both forms are held to the reference (tests/model/test_moe_paths.py, tests/kernels/test_moe_cpu_paths.py).

``grouped_experts`` is the driver shared with the quantized experts (quant/int_cpu.py): it groups the pairs and
calls ``ffn(e, rows)`` once per expert hit, so the packed int matmuls get the same grouping.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

ExpertFFN = Callable[[int, torch.Tensor], torch.Tensor]  # (local expert, rows [c, D]) -> [c, D] in the rows' dtype


def moe_grouped(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor, expert_start: int = 0,
                linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear) -> torch.Tensor:
    """The experts with float weights w13 [E_local, 2F, D], w2 [E_local, D, F]: ``grouped_experts`` with each
    expert's SwiGLU as two GEMMs through ``linear`` (``F.linear``'s contract; the dispatch passes
    cpu_ops.expert_linear)."""
    def ffn(e: int, rows: torch.Tensor) -> torch.Tensor:
        gate, up = linear(rows, w13[e]).chunk(2, dim=-1)  # [c, F]
        return linear(F.silu(gate) * up, w2[e])  # [c, D]

    return grouped_experts(x, topk_weights, topk_ids, expert_start, w13.shape[0], ffn)


def grouped_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, expert_start: int,
                    num_local: int, ffn: ExpertFFN) -> torch.Tensor:
    """Sum over each token's chosen local experts of weight * ffn(expert, token), each expert called once on all
    its rows, in increasing expert order (the reference's order, so bf16 sums round alike)."""
    if topk_ids.shape[0] == 1:
        return _one_token(x, topk_weights, topk_ids, expert_start, num_local, ffn)
    return _sorted(x, topk_weights, topk_ids, expert_start, num_local, ffn)


def _sorted(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, expert_start: int,
            num_local: int, ffn: ExpertFFN) -> torch.Tensor:
    """Sort the N*k (token, expert) pairs by expert and run each expert once on its contiguous group.

    Example (k 2, E_local 2 at expert_start 0): ids [[1, 0], [1, 0]] -> pairs sorted [t0e0, t1e0, t0e1, t1e1],
    counts [2, 2]: expert 0 multiplies rows [x0, x1], expert 1 the same rows; each result, times its fp32
    weight, is added back into its token's row.
    """
    k = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1) - expert_start  # [N*k] local ids; out of range = other rank
    order = torch.argsort(flat_ids, stable=True)  # [N*k]
    sorted_ids = flat_ids[order]
    token_of_pair = order // k  # [N*k] which token each sorted pair belongs to
    # Pairs of lower-numbered ranks sort first (negative ids), of higher ones after every local group.
    counts = torch.bincount(sorted_ids.clamp(0, num_local).masked_fill(sorted_ids < 0, num_local),
                            minlength=num_local + 1)[:num_local].tolist()
    first_local = int((sorted_ids < 0).sum())
    xs = x[token_of_pair]  # [N*k, D] rows in expert order
    ys = torch.zeros_like(xs)
    start = first_local
    for e, c in enumerate(counts):
        if c:
            ys[start:start + c] = ffn(e, xs[start:start + c])
            start += c
    w = topk_weights.reshape(-1)[order]  # [N*k] fp32
    out = torch.zeros_like(x)
    out.index_add_(0, token_of_pair, (ys * w[:, None]).to(x.dtype))
    return out


def _one_token(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, expert_start: int,
               num_local: int, ffn: ExpertFFN) -> torch.Tensor:
    """``_sorted``'s result for one token (x [1, D]): each of its local experts on x itself, in increasing expert
    order, each output times its fp32 weight (a [1] slice, so the product is fp32 as the reference's) rounded once
    to x's dtype and added. Example (k 2): ids [[5, 1]] -> out = 0 + w[1] * ffn(1, x) + w[0] * ffn(5, x)."""
    w = topk_weights.reshape(-1)  # [k] fp32
    ids = (topk_ids.reshape(-1) - expert_start).tolist()
    out = torch.zeros_like(x)
    for slot in sorted(range(len(ids)), key=ids.__getitem__):
        if 0 <= ids[slot] < num_local:
            out = out + (ffn(ids[slot], x) * w[slot:slot + 1]).to(x.dtype)
    return out

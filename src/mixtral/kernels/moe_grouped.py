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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_grouped(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor, expert_start: int = 0) -> torch.Tensor:
    """Sort the N*k (token, expert) pairs by expert and run each expert once on its contiguous group.

    Example (k 2, E_local 2 at expert_start 0): ids [[1, 0], [1, 0]] -> pairs sorted [t0e0, t1e0, t0e1, t1e1],
    counts [2, 2]: expert 0 multiplies rows [x0, x1], expert 1 the same rows; each result, times its fp32
    weight, is added back into its token's row.
    """
    k = topk_ids.shape[1]
    e_local = w13.shape[0]
    flat_ids = topk_ids.reshape(-1) - expert_start  # [N*k] local ids; out of range = other rank
    order = torch.argsort(flat_ids, stable=True)  # [N*k]
    sorted_ids = flat_ids[order]
    token_of_pair = order // k  # [N*k] which token each sorted pair belongs to
    # Pairs of lower-numbered ranks sort first (negative ids), of higher ones after every local group.
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

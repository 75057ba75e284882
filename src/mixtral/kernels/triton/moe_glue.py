"""The glue around the prefill MoE's two GEMMs (``sorted_moe.py``): the experts contract check, the sort of
(token, expert) pairs into expert order, and the weighted top-k sum back into token order.

``sort_pairs`` and ``combine`` run one Triton pass each on CUDA where autograd records nothing (the kernels have
no backward): the counting sort of ``moe_align.sort_pairs`` and ``weighted_topk_sum`` below; elsewhere (CPU
tensors under the interpreter tests, autograd) their PyTorch forms, which define the layout. Done with
PyTorch ops on the GPU the sum costs three to six passes over the same bytes (fp32 temporaries of
[N, k, D]), the sort a sort, a search and a scatter (~280 us at 2048 tokens on an H100).

The sum reads ``num_local`` (the last group end, a device scalar) instead of a host int: rows from it on belong
to another expert-parallel rank, were never written by the GEMMs (may hold NaN) and are skipped. No host
sync, so a step stays capturable in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixtral.kernels.triton.pdl import pdl_args, pdl_enter


def check_contract(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor) -> None:
    """ValueError naming the bad shape when the inputs do not fit the experts contract."""
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"moe: expected x [N, D], w13 [E, 2F, D], w2 [E, D, F]; got x "
                         f"{tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    n, d = x.shape
    e, two_f, d13 = w13.shape
    if d13 != d or two_f % 2 or tuple(w2.shape) != (e, d, two_f // 2):
        raise ValueError(f"moe: x {tuple(x.shape)}, w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} "
                         "do not fit x [N, D], w13 [E, 2F, D], w2 [E, D, F]")
    if topk_ids.dim() != 2 or topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != n:
        raise ValueError(f"moe: topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [N={n}, k]")


def _triton_glue(t: torch.Tensor) -> bool:
    """The Triton glue kernels run on CUDA where autograd records nothing (they have no backward)."""
    return t.is_cuda and not (torch.is_grad_enabled() and t.requires_grad)


def sort_pairs(topk_ids: torch.Tensor, e_local: int, expert_start: int = 0, pdl: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [N, k] global ids -> (order [P], row_of_pair [P], offs [E_local] int32), P = N * k.

    ``order[r]`` is the pair (t * k + j) in sorted row r; ``row_of_pair`` is its inverse; ``offs[e]`` is the
    end row of local expert e's group, so ``offs[-1]`` counts the local pairs. Other ranks' pairs follow
    every local group; inside a group pairs keep their (token, slot) order (a stable sort). Device ops only
    (a sort, a ``searchsorted``, a scatter): no host sync. Keys are int32 (half the radix passes of int64).

    Example (E_local 2 at expert_start 2): ids [[2, 0], [3, 2]] -> keys [0, 2, 1, 0] (global 0 is another
    rank's: key E_local), order [0, 3, 2, 1], row_of_pair [0, 3, 2, 1], offs [2, 3].

    On CUDA one Triton counting sort does the same (``moe_align.sort_pairs``, int32 outputs).
    """
    if _triton_glue(topk_ids):
        from mixtral.kernels.triton.moe_align import sort_pairs as sort_pairs_triton

        return sort_pairs_triton(topk_ids, e_local, expert_start, pdl)
    flat = topk_ids.reshape(-1) - expert_start  # [P] local expert of each pair
    key = torch.where((flat >= 0) & (flat < e_local), flat, e_local).to(torch.int32)  # [P] others sort last
    sorted_key, order = torch.sort(key, stable=True)  # [P], [P]
    experts = torch.arange(e_local, device=key.device, dtype=torch.int32)  # [E]
    offs = torch.searchsorted(sorted_key, experts, right=True, out_int32=True)  # [E] end row of each group
    row_of_pair = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return order, row_of_pair, offs


def combine(y: torch.Tensor, row_of_pair: torch.Tensor, topk_weights: torch.Tensor, num_local: torch.Tensor,
            pdl: bool = True) -> torch.Tensor:
    """y [P, D] in sorted order -> [N, D]: per token the fp32 sum of weight * its k rows, rounded once; rows
    from ``num_local`` on (other ranks') are dropped with a select, since their memory may hold NaN and
    NaN * 0 is NaN."""
    n, k = topk_weights.shape
    if _triton_glue(y):
        return weighted_topk_sum(y if y.stride(-1) == 1 else y.contiguous(), row_of_pair, topk_weights, num_local,
                                 pdl=pdl)
    y_pairs = y.index_select(0, row_of_pair).view(n, k, -1)  # [N, k, D] back in (token, slot) order
    weighted = y_pairs.float() * topk_weights.float().view(n, k, 1)  # fp32, as the reference applies it
    local = (row_of_pair < num_local).view(n, k, 1)  # [N, k, 1]
    return torch.where(local, weighted, 0.0).sum(dim=1).to(y.dtype)  # [N, D]


@triton.jit
def _weighted_topk_sum_kernel(y_ptr, row_of_pair_ptr, weights_ptr, out_ptr, num_local_ptr, D, stride_y, stride_o,
                              TOP_K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """out[t, c] = sum_j weights[t, j] * y[row_of_pair[t, j], c] over the pairs whose row < num_local."""
    pdl_enter(PDL)
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    num_local = tl.load(num_local_ptr)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = token.to(tl.int64) * TOP_K + j
        row = tl.load(row_of_pair_ptr + pair)
        w = tl.load(weights_ptr + pair).to(tl.float32)
        # Another rank's row is never read (its memory was never written): no column is in bounds for it.
        limit = tl.where(row < num_local, D, 0)
        y = tl.load(y_ptr + row.to(tl.int64) * stride_y + cols, mask=cols < limit, other=0.0)
        acc += w * y.to(tl.float32)
    tl.store(out_ptr + token.to(tl.int64) * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < D)


def weighted_topk_sum(y: torch.Tensor, row_of_pair: torch.Tensor, topk_weights: torch.Tensor,
                      num_local: torch.Tensor, block: int = 1024, pdl: bool = True) -> torch.Tensor:
    """y [P, D] rows in expert order; row_of_pair [N*k] (pair t*k+j -> its row of y); topk_weights [N, k] fp32;
    num_local (device, one element): rows from it on are another rank's and add nothing -> [N, D] in y's dtype.

    Example, k 2: row_of_pair [2, 0, 1, 3], num_local 3 -> out[0] = w00 y[2] + w01 y[0], out[1] = w10 y[1]
    (row 3 is past num_local: skipped).
    """
    n, k = topk_weights.shape
    d = y.shape[1]
    if row_of_pair.numel() != n * k or y.dim() != 2 or y.stride(-1) != 1:
        raise ValueError(f"weighted_topk_sum: y {tuple(y.shape)} (strides {y.stride()}), row_of_pair "
                         f"{tuple(row_of_pair.shape)} and topk_weights {tuple(topk_weights.shape)} do not fit "
                         "y [P, D] contiguous rows, row_of_pair [N*k], topk_weights [N, k]")
    out = torch.empty(n, d, dtype=y.dtype, device=y.device)  # [N, D]
    if n == 0 or d == 0:
        return out
    block = min(block, triton.next_power_of_2(d))
    _weighted_topk_sum_kernel[(n, triton.cdiv(d, block))](
        y, row_of_pair.contiguous(), topk_weights.float().contiguous(), out, num_local, d, y.stride(0),
        out.stride(0), TOP_K=k, BLOCK=block, num_warps=4 if block >= 512 else 1, **pdl_args(y, pdl),
    )
    return out

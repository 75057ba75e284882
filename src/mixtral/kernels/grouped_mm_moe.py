"""MoE experts as two CUTLASS grouped GEMMs (``torch._grouped_mm``): large token counts with no host sync.

Same contract as ``reference.moe_reference`` and the Triton ``fused_moe``: x [N, D], w13 [E_local, 2F, D]
(w1 rows then w3 rows), w2 [E_local, D, F], topk_weights [N, k] fp32, topk_ids [N, k] global expert ids;
pairs whose expert lives on another expert-parallel rank add nothing.

Steps, all on the device and without a host sync (so a prefill step never waits on the CPU):
1. key each (token, slot) pair by its local expert, other ranks' pairs by E_local (they sort last);
   a stable sort gives the pair order, ``searchsorted`` the int32 end row of each expert's group;
2. gather x rows into that order and run ``_grouped_mm`` against w13^T: [P, D] x [E, D, 2F] -> [P, 2F];
   rows past the last local group (other ranks' pairs) are never multiplied and stay uninitialised;
3. SiLU(gate) * up in fp32, rounded once (Triton on CUDA: kernels/triton/moe_glue.py; PyTorch elsewhere);
4. ``_grouped_mm`` against w2^T: [P, F] x [E, F, D] -> [P, D];
5. per token, gather its k rows, scale by the fp32 weights, skip other ranks' rows (their memory may hold
   NaN, and NaN * 0 is NaN), sum in fp32 and round once (Triton on CUDA, PyTorch elsewhere).

Where it is fast: on sm90 / sm100 with bf16 operands PyTorch runs CUTLASS's grouped GEMM (TMA, warp
specialised). Anywhere else ``_grouped_mm`` loops over the groups after copying the offsets to the host, which
is correct but syncs; ``ops.fused_moe`` only dispatches here where the fast path applies (see
``device_problem``). CUTLASS's TMA needs 16-byte aligned strides, so D and F must be multiples of 8 bf16
elements (``layout_problem``); the Mixtral shapes are.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def check_contract(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor) -> None:
    """ValueError naming the bad shape when the inputs do not fit the experts contract."""
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"grouped_mm_moe: expected x [N, D], w13 [E, 2F, D], w2 [E, D, F]; got x "
                         f"{tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    n, d = x.shape
    e, two_f, d13 = w13.shape
    if d13 != d or two_f % 2 or tuple(w2.shape) != (e, d, two_f // 2):
        raise ValueError(f"grouped_mm_moe: x {tuple(x.shape)}, w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} "
                         "do not fit x [N, D], w13 [E, 2F, D], w2 [E, D, F]")
    if topk_ids.dim() != 2 or topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != n:
        raise ValueError(f"grouped_mm_moe: topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [N={n}, k]")


def layout_problem(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> str | None:
    """Why ``_grouped_mm`` would refuse these operands (None when it takes them).

    It needs one dtype for all three, 16-byte aligned row strides and group strides (D and F multiples of
    16 / element size, e.g. 8 for bf16), weights contiguous in their last dim, and 16-byte aligned weight
    storage (CUTLASS builds a TMA descriptor per expert from base + e * stride).
    """
    if not (x.dtype == w13.dtype == w2.dtype):
        return f"x, w13 and w2 must share one dtype, got {x.dtype}, {w13.dtype}, {w2.dtype}"
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"dtype {x.dtype} is not one _grouped_mm multiplies (bf16, fp16, fp32)"
    size = x.element_size()
    align = 16 // size
    d, f = x.shape[1], w2.shape[2]
    if d % align or f % align:
        return (f"D={d} and F={f} must be multiples of {align} ({x.dtype}: 16-byte aligned strides for "
                "CUTLASS's TMA loads)")
    for name, w in (("w13", w13), ("w2", w2)):
        if w.stride(-1) != 1 or w.stride(1) % align or w.stride(0) % align:
            return f"{name} strides {w.stride()} must be contiguous in the last dim and 16-byte aligned"
        if w.is_cuda and w.data_ptr() % 16:
            return f"{name} storage starts at an address that is not 16-byte aligned"
    return None


@functools.lru_cache(maxsize=16)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def device_problem(x: torch.Tensor) -> str | None:
    """Why ``_grouped_mm`` would not take its CUTLASS fast path for x's device and dtype (None when it does).

    The fast path is bf16 on compute capability 9.x or 10.x; elsewhere PyTorch copies the group offsets to
    the host and loops over experts, a sync in the middle of every layer.
    """
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no _grouped_mm"
    if not x.is_cuda:
        return f"x lives on {x.device}, the CUTLASS grouped GEMM is CUDA only"
    major, minor = _capability(x.device)
    if major not in (9, 10):
        return f"compute capability {major}.{minor}: the CUTLASS grouped GEMM is built for 9.x and 10.x"
    if x.dtype != torch.bfloat16:
        return f"dtype {x.dtype}: the CUTLASS grouped GEMM is bf16 only"
    return None


def _triton_glue(t: torch.Tensor) -> bool:
    """The Triton glue kernels run on CUDA where autograd records nothing (they have no backward)."""
    return t.is_cuda and not (torch.is_grad_enabled() and t.requires_grad)


def sort_pairs(topk_ids: torch.Tensor, e_local: int, expert_start: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [N, k] global ids -> (order [P], row_of_pair [P], offs [E_local] int32), P = N * k.

    ``order[r]`` is the pair (t * k + j) in sorted row r; ``row_of_pair`` is its inverse; ``offs[e]`` is the
    end row of local expert e's group, so ``offs[-1]`` counts the local pairs. Other ranks' pairs follow
    every local group; inside a group pairs keep their (token, slot) order (a stable sort). Device ops only
    (a sort, a ``searchsorted``, a scatter): no host sync. Keys are int32 (half the radix passes of int64).

    Example (E_local 2 at expert_start 2): ids [[2, 0], [3, 2]] -> keys [0, 2, 1, 0] (global 0 is another
    rank's: key E_local), order [0, 3, 2, 1], row_of_pair [0, 3, 2, 1], offs [2, 3].

    On CUDA one Triton program does the same as a counting sort (``moe_align.sort_pairs``, int32 outputs):
    the sort, search and scatter below cost ~280 us at 2048 tokens on an H100 (``gpu_moe_paths --breakdown``).
    """
    if _triton_glue(topk_ids):
        from mixtral.kernels.triton.moe_align import sort_pairs as sort_pairs_triton

        return sort_pairs_triton(topk_ids, e_local, expert_start)
    flat = topk_ids.reshape(-1) - expert_start  # [P] local expert of each pair
    key = torch.where((flat >= 0) & (flat < e_local), flat, e_local).to(torch.int32)  # [P] others sort last
    sorted_key, order = torch.sort(key, stable=True)  # [P], [P]
    experts = torch.arange(e_local, device=key.device, dtype=torch.int32)  # [E]
    offs = torch.searchsorted(sorted_key, experts, right=True, out_int32=True)  # [E] end row of each group
    row_of_pair = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return order, row_of_pair, offs


def silu_mul(h: torch.Tensor, num_rows: torch.Tensor) -> torch.Tensor:
    """h [P, 2F] gate|up -> silu(gate) * up [P, F] in h's dtype: fp32 math, one rounding.

    ``num_rows`` (device, one element) bounds the rows worth computing; the Triton kernel skips the rest."""
    if _triton_glue(h):
        from mixtral.kernels.triton.moe_glue import silu_mul as silu_mul_triton

        return silu_mul_triton(h if h.stride(-1) == 1 else h.contiguous(), num_rows)
    f = h.shape[1] // 2
    return (F.silu(h[:, :f].float()) * h[:, f:].float()).to(h.dtype)


def combine(y: torch.Tensor, row_of_pair: torch.Tensor, topk_weights: torch.Tensor, num_local: torch.Tensor
            ) -> torch.Tensor:
    """y [P, D] in sorted order -> [N, D]: per token the fp32 sum of weight * its k rows, rounded once; rows
    from ``num_local`` on (other ranks') are dropped with a select, since their memory may hold NaN and
    NaN * 0 is NaN."""
    n, k = topk_weights.shape
    if _triton_glue(y):
        from mixtral.kernels.triton.moe_glue import weighted_topk_sum

        return weighted_topk_sum(y if y.stride(-1) == 1 else y.contiguous(), row_of_pair, topk_weights, num_local)
    y_pairs = y.index_select(0, row_of_pair).view(n, k, -1)  # [N, k, D] back in (token, slot) order
    weighted = y_pairs.float() * topk_weights.float().view(n, k, 1)  # fp32, as the reference applies it
    local = (row_of_pair < num_local).view(n, k, 1)  # [N, k, 1]
    return torch.where(local, weighted, 0.0).sum(dim=1).to(y.dtype)  # [N, D]


def grouped_mm_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, expert_start: int = 0) -> torch.Tensor:
    """x [N, D]; w13 [E_local, 2F, D]; w2 [E_local, D, F]; topk_weights [N, k] fp32; topk_ids [N, k] global ids
    -> [N, D] in x's dtype: sum over each token's local experts of weight * w2(silu(w1 x) * w3 x).

    Raises ValueError when the shapes break the contract or ``_grouped_mm`` cannot take the layout
    (``layout_problem``); ``ops.fused_moe`` checks first and takes the Triton kernel instead.
    """
    check_contract(x, w13, w2, topk_weights, topk_ids)
    problem = layout_problem(x, w13, w2)
    if problem is not None:
        raise ValueError(f"grouped_mm_moe: {problem}; ops.fused_moe takes the Triton kernel for such shapes")
    n, d = x.shape
    if n == 0:
        return x.new_zeros(0, d)
    k = topk_ids.shape[1]
    order, row_of_pair, offs = sort_pairs(topk_ids, w13.shape[0], expert_start)  # [P], [P], [E]
    num_local = offs[-1:]  # [1] rows from here on are other ranks' pairs: never multiplied
    x_sorted = x.index_select(0, order // k)  # [P, D] row r = token of sorted pair r
    h = torch._grouped_mm(x_sorted, w13.transpose(-2, -1), offs=offs)  # [P, 2F]
    act = silu_mul(h, num_local)  # [P, F]
    y = torch._grouped_mm(act, w2.transpose(-2, -1), offs=offs)  # [P, D] rows in sorted order
    return combine(y, row_of_pair, topk_weights, num_local)  # [N, D]

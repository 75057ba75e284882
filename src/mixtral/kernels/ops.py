"""Dispatch for the fused ops the model and engine call: the fastest implementation for the device.

Every op has a PyTorch reference in ``kernels/reference.py``; GPU kernels live in ``kernels/triton``. On a
CUDA tensor with Triton importable the Triton kernel runs, anywhere else the reference (CPU, or a GPU box
without Triton). ``MIXTRAL_KERNELS=reference`` forces the reference everywhere (debugging a kernel).
Callers (model/moe.py, engine/model_runner.py) import only this module.

``fused_moe`` is the experts path model/moe.py registers as ``EXPERT_PATHS["triton"]``; at prefill-sized
token counts on sm90+ it hands over to the sorted-row TMA GEMMs of ``kernels/triton/sorted_moe.py``.

The small ops around the big kernels (``rms_norm``, ``add_rms_norm``, ``rope_qk``, ``route_topk``) have
Triton kernels without a backward: they run only where autograd records nothing (inference mode, no_grad,
or inputs that need no grad); training takes the reference, whose results on CPU are the model's ground truth.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import TYPE_CHECKING

import torch

from mixtral.kernels import reference

if TYPE_CHECKING:
    from mixtral.kernels.triton.moe_configs import MoEConfig


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether the Triton package can be imported (it is an optional ``gpu`` extra)."""
    return importlib.util.find_spec("triton") is not None


def use_triton(t: torch.Tensor) -> bool:
    """True when ``t`` lives on a CUDA device, Triton is installed and MIXTRAL_KERNELS is not 'reference'."""
    return t.is_cuda and triton_available() and os.environ.get("MIXTRAL_KERNELS", "") != "reference"


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k/v [N, KV, hd] -> k_cache/v_cache [num_blocks, block_size, KV, hd] at slot_mapping [N] (-1 skips)."""
    if use_triton(k_cache):
        from mixtral.kernels.triton.write_kv import write_kv as write_kv_triton

        write_kv_triton(k, v, k_cache, v_cache, slot_mapping)
        return
    reference.write_kv_reference(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, query_start_loc: torch.Tensor, *, max_query_len: int,
                    max_context_len: int, sliding_window: int | None = None) -> torch.Tensor:
    """Ragged causal attention over paged K/V; see ``reference.paged_attention_reference`` for the layout.

    q [N, H, hd]; block_tables [S, max_blocks] int32; context_lens [S]; query_start_loc [S + 1].
    ``max_query_len`` / ``max_context_len`` are host ints (1 for pure decode) so kernels pick a launch
    shape without reading device memory; they must bound the true lengths (a CUDA graph captured with
    them is valid for every batch whose lengths stay within them).
    """
    if use_triton(q):
        from mixtral.kernels.triton.paged_attention import paged_attention as paged_attention_triton

        return paged_attention_triton(q, k_cache, v_cache, block_tables, context_lens, query_start_loc,
                                      max_query_len=max_query_len, max_context_len=max_context_len,
                                      sliding_window=sliding_window)
    return reference.paged_attention_reference(q, k_cache, v_cache, block_tables, context_lens, query_start_loc,
                                               sliding_window)


# From this many new tokens in every sequence, a step of fresh prompts (nothing cached before them) takes its
# attention from PyTorch's SDPA with cuDNN first. The kernel alone is faster from ~1024 tokens (H100, 32/8
# heads, head_dim 128: 85 us against the paged Triton kernel's 154 at 2048 tokens, 0.94 ms against 1.67 at
# 8192; Triton led at 512, scripts/gpu_prefill_attention.py), but each call also costs ~1 ms of host time,
# which a lone 2048-token prefill cannot hide (its whole forward pass launched in 34 ms instead of 17, and
# the step got slower; scripts/gpu_prefill_breakdown.py). Longer prompts give the GPU enough work per layer.
DENSE_PREFILL_MIN_TOKENS = 4096
# Inside a CUDA graph (engine/cuda_graphs.PrefillGraph) the host cost is paid once at capture, so the dense path
# takes over where its kernel wins: from ~1024 tokens.
GRAPH_DENSE_PREFILL_MIN_TOKENS = 1024


def dense_prefill_supported(q: torch.Tensor, sliding_window: int | None) -> bool:
    """Whether ``dense_prefill_attention`` can serve q's device and dtype at all (lengths aside): CUDA with the
    fast kernels, bf16/fp16, no sliding window, ``MIXTRAL_DENSE_PREFILL`` not '0'."""
    return (use_triton(q) and sliding_window is None and q.dtype in (torch.bfloat16, torch.float16)
            and os.environ.get("MIXTRAL_DENSE_PREFILL", "1") != "0")


def dense_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int],
                            sliding_window: int | None = None, min_tokens: int | None = None) -> torch.Tensor | None:
    """Causal attention of fresh prompts over their own new tokens only: q [N, H, hd], k/v [N, KV, hd], the
    sequences back to back with ``seq_lens`` (host ints) new tokens each -> [N, H, hd]; or None where the
    paged kernel should run instead (``dense_prefill_supported`` says no, a prompt shorter than ``min_tokens``
    (default ``DENSE_PREFILL_MIN_TOKENS``), or autograd). GQA without repeated K/V (``enable_gqa``); the
    caller has already stored K/V in the paged cache for later steps."""
    min_tokens = DENSE_PREFILL_MIN_TOKENS if min_tokens is None else min_tokens
    if (not dense_prefill_supported(q, sliding_window) or not seq_lens or min(seq_lens) < min_tokens
            or sum(seq_lens) != q.shape[0] or not _no_autograd(q, k, v)):
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = torch.empty_like(q)  # [N, H, hd]
    start = 0
    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(backends, set_priority=True):
        for n in seq_lens:
            rows = slice(start, start + n)
            heads_first = [t[rows].transpose(0, 1)[None] for t in (q, k, v)]  # [1, H or KV, n, hd] views
            o = torch.nn.functional.scaled_dot_product_attention(*heads_first, is_causal=True, enable_gqa=True)
            out[rows] = o[0].transpose(0, 1)  # [n, H, hd]
            start += n
    return out


# From this many tokens on, fused_moe runs the experts as the sorted-row Triton GEMMs with TMA loads
# (kernels/triton/sorted_moe.py) on sm90+ in 2-byte dtypes; below it the decode kernel (fused_moe.py), which
# reads only the experts hit. See kernels/triton/NOTES.md for the measurements behind the numbers.
SORTED_MIN_TOKENS = 1024
# The CUTLASS grouped GEMMs (kernels/grouped_mm_moe.py) and one cuBLAS GEMM per expert
# (kernels/expert_gemms_moe.py; one host sync per layer, never inside a CUDA graph) were the prefill paths
# before the sorted one; they stay selectable for comparison (MIXTRAL_MOE_PREFILL), from this many tokens.
GROUPED_MM_MIN_TOKENS = 2048
PREFILL_PATHS = ("sorted", "grouped_mm", "expert_gemms", "triton")


def _prefill_choice() -> str:
    """``MIXTRAL_MOE_PREFILL`` (sorted, grouped_mm, expert_gemms, triton; unset = sorted): the path for
    prefill-sized token counts. ``triton`` keeps the decode kernel at every size."""
    choice = os.environ.get("MIXTRAL_MOE_PREFILL", "") or "sorted"
    if choice not in PREFILL_PATHS:
        raise ValueError(f"MIXTRAL_MOE_PREFILL={choice!r}: use one of {', '.join(PREFILL_PATHS)} or leave it unset")
    return choice


@functools.lru_cache(maxsize=16)
def _sm90(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def sorted_config(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> MoEConfig | None:
    """The tiles ``fused_moe`` runs the sorted-row TMA path with, or None where it does not take it (the
    caller checked CUDA/Triton): from ``SORTED_MIN_TOKENS`` tokens, 2-byte dtypes, sm90+ and shapes that fit
    the tuned tiles. Looked up once per call and handed to ``sorted_moe``."""
    if x.shape[0] < SORTED_MIN_TOKENS or x.element_size() != 2 or not _sm90(x.device):
        return None
    from mixtral.kernels.triton.moe_configs import get_sorted_config
    from mixtral.kernels.triton.sorted_moe import layout_problem

    cfg = get_sorted_config(w13.shape[0], w2.shape[2], x.shape[1], x.shape[0], x.dtype, x.device)
    return cfg if layout_problem(x, w13, w2, cfg) is None else None


def use_grouped_mm(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether ``_grouped_mm`` has its CUTLASS fast path for these operands and accepts the layout."""
    from mixtral.kernels import grouped_mm_moe

    return grouped_mm_moe.device_problem(x) is None and grouped_mm_moe.layout_problem(x, w13, w2) is None


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, expert_start: int = 0) -> torch.Tensor:
    """The experts of a MoE layer: x [N, D], w13 [E, 2F, D], w2 [E, D, F], topk_weights [N, k] fp32,
    topk_ids [N, k] global ids -> [N, D]. On CUDA: the sorted-row TMA GEMMs for prefill-sized token counts
    (``sorted_config``; ``MIXTRAL_MOE_PREFILL`` picks another prefill path), else the Triton fused kernel;
    ``moe_reference`` elsewhere."""
    if not use_triton(x):
        return reference.moe_reference(x, w13, w2, topk_weights, topk_ids, expert_start)
    choice = _prefill_choice()
    n = x.shape[0]
    cfg = sorted_config(x, w13, w2) if choice == "sorted" else None
    if cfg is not None:
        from mixtral.kernels.triton.sorted_moe import sorted_moe

        return sorted_moe(x, w13, w2, topk_weights, topk_ids, expert_start, config=cfg)
    if (choice == "expert_gemms" and n >= GROUPED_MM_MIN_TOKENS
            and not (x.is_cuda and torch.cuda.is_current_stream_capturing())):
        from mixtral.kernels.expert_gemms_moe import expert_gemms_moe

        return expert_gemms_moe(x, w13, w2, topk_weights, topk_ids, expert_start)
    if choice in ("grouped_mm", "sorted") and n >= GROUPED_MM_MIN_TOKENS and use_grouped_mm(x, w13, w2):
        from mixtral.kernels.grouped_mm_moe import grouped_mm_moe

        return grouped_mm_moe(x, w13, w2, topk_weights, topk_ids, expert_start)
    from mixtral.kernels.triton.fused_moe import fused_moe as fused_moe_triton

    return fused_moe_triton(x, w13, w2, topk_weights, topk_ids, expert_start)


def _no_autograd(*tensors: torch.Tensor) -> bool:
    """True when autograd will not record an op on ``tensors`` (the small Triton kernels have no backward)."""
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D], weight [D] -> weight * rmsnorm(x) [..., D]; see ``reference.rms_norm_reference``."""
    if use_triton(x) and _no_autograd(x, weight):
        from mixtral.kernels.triton.rmsnorm import rms_norm as rms_norm_triton

        return rms_norm_triton(x, weight, eps)
    return reference.rms_norm_reference(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [..., D] -> (rms_norm(x + residual), x + residual): a block's residual add and the next
    norm in one kernel on CUDA; see ``reference.add_rms_norm_reference``."""
    if (use_triton(x) and x.dtype == residual.dtype and x.shape == residual.shape
            and _no_autograd(x, residual, weight)):
        from mixtral.kernels.triton.rmsnorm import add_rms_norm as add_rms_norm_triton

        return add_rms_norm_triton(x, residual, weight, eps)
    return reference.add_rms_norm_reference(x, residual, weight, eps)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, H, hd], k [N, KV, hd], cos/sin [N, hd] -> rotated (q, k); see ``reference.rope_qk_reference``.
    The Triton kernel needs one dtype for all four (the model's case); mixed dtypes take the reference."""
    if (use_triton(q) and len({q.dtype, k.dtype, cos.dtype, sin.dtype}) == 1
            and _no_autograd(q, k, cos, sin)):
        from mixtral.kernels.triton.rope import rope_qk as rope_qk_triton

        return rope_qk_triton(q, k, cos, sin)
    return reference.rope_qk_reference(q, k, cos, sin)


def rope_qk_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``rope_qk`` then ``write_kv`` of the rotated k and v at ``slot_mapping`` (-1 skips): one Triton kernel on
    CUDA when ``rope_qk``'s kernel applies and the cache has k's dtype, the two steps otherwise."""
    if (use_triton(q) and len({q.dtype, k.dtype, v.dtype, cos.dtype, sin.dtype, k_cache.dtype}) == 1
            and _no_autograd(q, k, v, cos, sin)):
        from mixtral.kernels.triton.rope import rope_qk as rope_qk_triton

        return rope_qk_triton(q, k, cos, sin, cache=(v, k_cache, v_cache, slot_mapping))
    q, k = rope_qk(q, k, cos, sin)
    write_kv(k, v, k_cache, v_cache, slot_mapping)
    return q, k


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T -> [M, N]: the Triton weight-streaming kernel for decode-sized M on CUDA at
    inference (kernels/triton/skinny_gemm.py), ``F.linear`` otherwise."""
    if (use_triton(x) and x.dim() == 2 and x.shape[0] <= 16 and x.dtype == weight.dtype
            and x.dtype in (torch.bfloat16, torch.float16) and _no_autograd(x, weight)):
        from mixtral.kernels.triton.skinny_gemm import skinny_gemm

        return skinny_gemm(x, weight)
    return torch.nn.functional.linear(x, weight)


# Up to this many tokens the router (gate GEMM, routing, counts) is one fused Triton kernel: at decode sizes it
# is pure latency, three launches in PyTorch. Beyond it cuBLAS's GEMM is the better gate.
GATE_FUSED_MAX_TOKENS = 256


def gate_route(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, counts: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The MoE router: x [N, D], gate_weight [E, D] -> (logits [N, E] in x's dtype, weights [N, k] fp32,
    ids [N, k] int64), and ``counts`` [E] int64 += each expert's choices (rows with ``mask`` [N] == 0 left out).

    One Triton kernel on CUDA at decode sizes (kernels/triton/gate_router.py; ``MIXTRAL_FUSED_GATE=0`` turns it
    off); else the Linear, ``route_topk`` and an ``index_add``."""
    if (use_triton(x) and x.shape[0] <= GATE_FUSED_MAX_TOKENS and x.dtype == gate_weight.dtype
            and gate_weight.shape[0] <= 64 and os.environ.get("MIXTRAL_FUSED_GATE", "1") != "0"
            and _no_autograd(x, gate_weight)):
        from mixtral.kernels.triton.gate_router import gate_route_fused

        return gate_route_fused(x, gate_weight, top_k, counts, mask)
    logits = torch.nn.functional.linear(x, gate_weight)  # [N, E]
    weights, ids = route_topk(logits, top_k)
    if counts is not None:
        reference.count_choices(counts, ids, mask)
    return logits, weights, ids


def route_topk(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [N, E] -> (weights [N, k] fp32, ids [N, k] int64); see ``reference.route_topk``."""
    if use_triton(router_logits) and _no_autograd(router_logits):
        from mixtral.kernels.triton.router import route_topk_fused

        return route_topk_fused(router_logits, top_k)
    return reference.route_topk(router_logits, top_k)

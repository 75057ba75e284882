"""Fast CPU forms of the small fused ops, for where the Triton kernels do not run (``backend='auto'`` on CPU).

At decode sizes on a CPU the work per op is microseconds, so what costs is the number of PyTorch calls and the
slow paths some calls take. Each function here has the contract of its ``kernels/reference.py`` counterpart
and is held to it by tests/kernels/test_cpu_ops.py:

- ``paged_decode_attention``: every sequence's one new token attends in ONE ``scaled_dot_product_attention``
  call over K/V gathered through the block tables, instead of a call per sequence. GQA is folded into the
  query-length axis (the G query heads sharing a KV head are G queries of that head: one new token has no causal
  order among them), which keeps SDPA on its fused CPU kernel; ``enable_gqa`` sends it to the math fallback that
  repeats K/V (measured on the demo model's shapes, bf16, one thread: 11 us against 26 for one sequence, 92
  against 415 for 16; the reference's per-sequence loop with its masks was ~75 us a layer for one sequence).
- ``write_kv``: ``index_copy_`` when no slot is -1 (CPU batches are never padded), the reference's boolean
  indexing otherwise.
- ``rope_qk``: the rotation as ``x * cos + roll(x, hd/2) * sin_signed`` with ``sin_signed = [-sin_lo, sin_hi]``:
  the same bf16 products and sum as the reference's ``cat(-x_hi, x_lo) * sin`` (negation is exact), in four
  calls a tensor instead of eight; bitwise equal.
- ``PackedWeights``: bf16 dense projections and the lm_head through oneDNN's prepacked weights (bitwise
  ``F.linear``, up to 2.6x faster at decode sizes; its docstring has the numbers).
- ``expert_linear``: the bf16 experts' GEMMs (moe_grouped.py) at decode sizes through the native bf16 GEMV
  (bf16_gemv.c, kernels/cpu_native.py), which reads each weight once as it is: ``F.linear`` reorders the weight on
  every call and prepacking every expert would double their memory. Measured (2 threads, µs, GEMV / F.linear):
  14336 x 2048 M = 1 1345 / 1939, M = 2 1884 / 1840; 2048 x 7168 M = 1 606 / 845; the demo's 640 x 192 M = 1 6 /
  16, M = 8 12 / 17, M = 16 21 / 19. So it takes one row, or up to ``GEMV_SMALL_ROWS`` rows of a weight of at
  most ``GEMV_SMALL_WEIGHT`` elements; each row's result is the same whatever M (batch-invariant), and equals
  ``F.linear``'s up to the order of its fp32 sums.

Not here: the MoE experts (moe_grouped.py, quant/int_cpu.py), the GPU kernels (triton/).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from mixtral.kernels import reference
from mixtral.kernels.cpu_native import bf16_gemv, native_int_dot

# The rows and weight sizes the native GEMV takes (module docstring).
GEMV_SMALL_ROWS = 8
GEMV_SMALL_WEIGHT = 1 << 20


def expert_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w)``: x [M, K], w [N, K] -> [M, N], through the native bf16 GEMV where it is faster (module
    docstring): bf16 CPU tensors, contiguous, K a multiple of 32, no autograd, the native kernels built."""
    m, (n, k) = x.shape[0], w.shape
    if (x.dtype == w.dtype == torch.bfloat16 and x.device.type == "cpu" and k % 32 == 0 and x.dim() == 2
            and (m == 1 or (m <= GEMV_SMALL_ROWS and n * k <= GEMV_SMALL_WEIGHT))
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            and x.is_contiguous() and w.is_contiguous() and native_int_dot() is not None):
        return bf16_gemv(x, w)
    return F.linear(x, w)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, max_context_len: int, sliding_window: int | None = None
                           ) -> torch.Tensor:
    """``reference.paged_attention_reference`` for steps where every sequence has exactly one new token.

    q [S, H, hd] (row i: sequence i's token at position context_lens[i] - 1); k_cache/v_cache
    [num_blocks, block_size, KV, hd]; block_tables [S, max_blocks]; context_lens [S]; ``max_context_len`` a
    host int bounding context_lens. -> [S, H, hd].

    Example (block_size 4, max_context_len 6): every sequence's first 2 table entries are gathered into 8 key
    slots; a sequence of length 5 masks slots 5-7 (and, with sliding_window 3, slots 0-1).
    """
    s, h, hd = q.shape
    bs, kvh = k_cache.shape[1], k_cache.shape[2]
    nb = -(-max_context_len // bs)
    # Entries past a sequence's own blocks are masked below; the clamp only keeps stale ones in range.
    tables = block_tables[:, :nb].to(torch.int64).clamp_(0, k_cache.shape[0] - 1)  # [S, nb]
    k = k_cache[tables].view(s, nb * bs, kvh, hd).transpose(1, 2)  # [S, KV, L, hd]
    v = v_cache[tables].view(s, nb * bs, kvh, hd).transpose(1, 2)
    kpos = torch.arange(nb * bs, device=q.device)  # [L]
    last = (context_lens.to(torch.int64) - 1)[:, None]  # [S, 1] the query's position
    mask = kpos <= last  # [S, L]
    if sliding_window is not None:
        mask &= kpos > last - sliding_window
    qg = q.view(s, kvh, h // kvh, hd)  # [S, KV, G, hd]: head i reads KV head i // G, as enable_gqa does
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask[:, None, None, :], scale=hd ** -0.5)
    return out.view(s, h, hd)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """``reference.write_kv_reference``: k/v [N, KV, hd] into their slots (-1 skips)."""
    if not bool((slot_mapping >= 0).all()):
        reference.write_kv_reference(k, v, k_cache, v_cache, slot_mapping)
        return
    slots = slot_mapping.to(torch.int64)
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v.to(v_cache.dtype))


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.rope_qk_reference``: q [N, H, hd], k [N, KV, hd], cos/sin [N, hd] -> rotated (q, k)."""
    half = q.shape[-1] // 2
    c = cos[:, None, :]  # [N, 1, hd]
    s = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)[:, None, :]  # [N, 1, hd]: the sign of rotate_half
    return q * c + q.roll(half, -1) * s, k * c + k.roll(half, -1) * s


class PackedWeights:
    """bf16 weights repacked once for oneDNN's CPU matmul, keyed by the weight they were made from.

    ``F.linear`` on a CPU bf16 weight reorders the weight on every call; the prepacked form
    (``torch.ops.mkldnn._reorder_linear_weight`` then ``_linear_pointwise``) gives bitwise the same result 1.5-2.6x
    faster at decode sizes (one thread, M = 1: a 32000 x 1024 lm_head 4.3 -> 1.6 ms, 7168 x 1024 482 -> 192 us;
    M = 16: 6.1 -> 3.8 ms; level from M = 512). A packed copy costs the weight's bytes again, so the dispatch packs
    only the dense projections and the lm_head (a few percent of a Mixtral), not the experts.

    An entry is remade when its weight was modified in place (``Tensor._version``) or given new data (``.data =``,
    as ``module.to`` does: a new data pointer), and dropped with it (a weak reference). Deep copies and pickles of
    the holder are empty: packed tensors have no storage to copy."""

    def __init__(self) -> None:
        # id(weight) -> (weak reference, (version, data pointer) when packed, packed weight)
        self._memo: dict[int, tuple[weakref.ref[torch.Tensor], tuple[int, int], torch.Tensor]] = {}

    def __deepcopy__(self, memo: dict) -> PackedWeights:
        return PackedWeights()

    def __getstate__(self) -> dict:
        return {"_memo": {}}

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        entry = self._memo.get(id(weight))
        # Inference tensors (made under torch.inference_mode) keep no version counter.
        state = (-1 if weight.is_inference() else weight._version, weight.data_ptr())
        if entry is not None and entry[0]() is weight and entry[1] == state:
            return entry[2]
        self._memo = {k: v for k, v in self._memo.items() if v[0]() is not None}  # forget freed weights
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
        self._memo[id(weight)] = (weakref.ref(weight), state, packed)
        return packed

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``F.linear(x, weight)`` (x [..., K], weight [N, K] bf16 on CPU) through the packed weight."""
        return torch.ops.mkldnn._linear_pointwise(x, self.get(weight), None, "none", [], "")


def packable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``PackedWeights.linear`` serves this call: bf16 on a CPU, a weight that is a module's own Parameter
    (not a tensor computed per call, such as a LoRA-adapted weight), nothing for autograd to record."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.bfloat16
            and isinstance(weight, torch.nn.Parameter)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))

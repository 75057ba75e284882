"""The one place that picks an implementation per fused op, from a ``KernelConfig``.

``Kernels(config)`` is built once (``Transformer.set_kernel_config``; the engine applies
``EngineConfig.kernels``) and shared by every layer, which calls its methods. Everything the config decides
is settled in the constructor; a call only checks what a tensor can take (CUDA or not, dtype, size,
autograd). No environment variable is read here (the Triton interpreter's switch, TRITON_INTERPRET, only by
``check_device`` once, and by Triton itself).

Every op has a PyTorch reference in ``kernels/reference.py``; the GPU kernels live in ``kernels/triton``. Where
Triton does not serve a tensor (a CPU with ``auto``), the small ops take their fast PyTorch forms in
``kernels/cpu_ops.py`` (batched decode attention, the K/V store, RoPE, prepacked bf16 Linears and lm_head), each
held to its reference; ``reference`` runs the references everywhere.
The Triton kernels have no backward: where autograd records (training) an op takes its PyTorch form. The
MoE experts: the sorted-row TMA GEMMs (``triton/sorted_moe.py``) at prefill-sized token counts on sm90+,
the Triton decode kernel (``triton/fused_moe.py``) below them, the grouped PyTorch path
(``moe_grouped.py``) where Triton does not run, ``moe_reference`` with the reference backend.

Quantized weights (quant/): ``quant_linear`` / ``quant_moe`` take the weight's ``QuantMethod`` and pick one of
its three entry points: the reference with the reference backend, its Triton kernels (given the config's
``pdl``) where Triton serves the tensor's device, its PyTorch fast path (CPU packed matmuls) elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os

import torch

from mixtral.kernels import cpu_ops, kv_fp8, reference
from mixtral.kernels.config import KernelConfig
from mixtral.kernels.kv_fp8 import KV_FP8
from mixtral.kernels.moe_grouped import moe_grouped
from mixtral.kernels.triton.moe_configs import MoEConfig
from mixtral.quant.base import QuantMethod, QuantTensors

# From this many new tokens in every sequence, a step of fresh prompts (nothing cached before them) takes its
# attention from PyTorch's SDPA with cuDNN first. The kernel alone is faster from ~1024 tokens (H100, 32/8
# heads, head_dim 128: 85 us against the paged Triton kernel's 154 at 2048 tokens, 0.94 ms against 1.67 at
# 8192; Triton led at 512), but each call also costs ~1 ms of host time, which a lone 2048-token prefill
# cannot hide (its whole forward pass launched in 34 ms instead of 17, and the step got slower). Longer
# prompts give the GPU enough work per layer.
DENSE_PREFILL_MIN_TOKENS = 4096
# Inside a CUDA graph (engine/cuda_graphs.PrefillGraph) the host cost is paid once at capture, so the dense path
# takes over where its kernel wins: from ~1024 tokens.
GRAPH_DENSE_PREFILL_MIN_TOKENS = 1024
# From this many tokens the MoE experts run as the sorted-row Triton GEMMs with TMA loads on sm90+ in 2-byte
# dtypes; below it the decode kernel, which reads only the experts hit (docs/KERNELS.md has the numbers).
SORTED_MIN_TOKENS = 1024
# Up to this many tokens the router (gate GEMM, routing, counts) is one fused Triton kernel: at decode sizes it
# is pure latency, three launches in PyTorch. Beyond it cuBLAS's GEMM is the better gate.
GATE_FUSED_MAX_TOKENS = 256
# Up to this many rows a Linear is the weight-streaming Triton kernel (triton/skinny_gemm.py).
SKINNY_MAX_ROWS = 16


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether the Triton package can be imported (it is an optional ``gpu`` extra)."""
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=16)
def _sm90(device: torch.device) -> bool:
    """A Hopper-or-newer CUDA device (a CPU tensor under the Triton interpreter is not one)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _no_autograd(*tensors: torch.Tensor) -> bool:
    """True when autograd will not record an op on ``tensors`` (the Triton kernels have no backward)."""
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


@functools.lru_cache(maxsize=64)
def _all_persistent(cfg: MoEConfig) -> MoEConfig:
    """``cfg`` with persistent tiles on both GEMMs (``moe_prefill='persistent'``); w2's paired short tiles are
    a non-persistent feature and go."""
    return dataclasses.replace(cfg, w13=dataclasses.replace(cfg.w13, persistent=True),
                               w2=dataclasses.replace(cfg.w2, persistent=True, pair_small=False))


class Kernels:
    """The fused ops of one ``KernelConfig``: shapes are documented per method; each has the contract of its
    ``kernels/reference.py`` counterpart."""

    def __init__(self, config: KernelConfig | None = None) -> None:
        self.config = config = config if config is not None else KernelConfig()
        if config.backend == "triton" and not triton_available():
            raise ValueError("kernel backend 'triton' needs the triton package (pip install 'mixtral[gpu]'); "
                             "choose 'auto' or 'reference'")
        # Triton for CUDA tensors (auto, triton) and for CPU tensors (triton: Triton's interpreter, tests).
        self._cuda = config.backend != "reference" and triton_available()
        self._cpu = config.backend == "triton"
        self._pdl = config.pdl
        self._fused_gate = config.fused_gate
        self._dense_prefill = config.dense_prefill
        self._sorted = config.moe_prefill in ("sorted", "persistent")
        self._persistent = config.moe_prefill == "persistent"
        self._moe_fallback = (reference.moe_reference if config.backend == "reference"
                              else functools.partial(moe_grouped, linear=cpu_ops.expert_linear))
        self._reference = config.backend == "reference"
        # bf16 Linears on a CPU through oneDNN's prepacked weights (cpu_ops.PackedWeights), built on first use.
        self._packed = cpu_ops.PackedWeights() if not self._reference and torch.backends.mkldnn.is_available() else None

    def __repr__(self) -> str:
        return f"Kernels({self.config})"

    def check_device(self, device: torch.device) -> None:
        """ValueError when the config cannot run on ``device``: the triton backend on a CPU without Triton's
        interpreter (TRITON_INTERPRET=1)."""
        if (self.config.backend == "triton" and device.type == "cpu"
                and os.environ.get("TRITON_INTERPRET", "0") != "1"):
            raise ValueError("kernel backend 'triton' needs a CUDA device (on a CPU only Triton's interpreter, "
                             "TRITON_INTERPRET=1, runs it); choose 'auto' or 'reference'")

    def triton_on(self, t: torch.Tensor) -> bool:
        """Whether the Triton kernels serve tensors on ``t``'s device."""
        return self._cuda if t.is_cuda else self._cpu

    def graph_safe(self, device: torch.device) -> bool:
        """Whether a forward pass on ``device`` runs without host syncs, so CUDA graphs can capture it: CUDA with
        the Triton kernels (the PyTorch attention and MoE paths read lengths and counts on the host)."""
        return device.type == "cuda" and self._cuda

    # ----------------------------------------------------------------- attention
    def write_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        """k/v [N, KV, hd] -> k_cache/v_cache [num_blocks, block_size, KV, hd] at slot_mapping [N] (-1 skips).
        An FP8 cache (float8_e4m3fn) stores codes of k / k_scale and v / v_scale (kernels/kv_fp8.py); other
        caches store the values and ignore the scales."""
        if self.triton_on(k_cache):
            from mixtral.kernels.triton.write_kv import write_kv

            write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, self._pdl)
            return
        if k_cache.dtype == KV_FP8:
            kv_fp8.write_kv_fp8_reference(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
            return
        if not self._reference:
            cpu_ops.write_kv(k, v, k_cache, v_cache, slot_mapping)
            return
        reference.write_kv_reference(k, v, k_cache, v_cache, slot_mapping)

    def paged_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, context_lens: torch.Tensor, query_start_loc: torch.Tensor, *,
                        max_query_len: int, max_context_len: int, sliding_window: int | None = None,
                        k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        """Ragged causal attention over paged K/V; see ``reference.paged_attention_reference`` for the layout.

        q [N, H, hd]; block_tables [S, max_blocks] int32; context_lens [S]; query_start_loc [S + 1].
        ``max_query_len`` / ``max_context_len`` are host ints (1 for pure decode) so kernels pick a launch
        shape without reading device memory; they must bound the true lengths (a CUDA graph captured with
        them is valid for every batch whose lengths stay within them). FP8 caches are read directly, codes
        times ``k_scale`` / ``v_scale`` (``kv_fp8.paged_attention_fp8_reference``).
        """
        if self.triton_on(q):
            from mixtral.kernels.triton.paged_attention import paged_attention

            return paged_attention(q, k_cache, v_cache, block_tables, context_lens, query_start_loc,
                                   max_query_len=max_query_len, max_context_len=max_context_len,
                                   sliding_window=sliding_window, k_scale=k_scale, v_scale=v_scale, pdl=self._pdl)
        if k_cache.dtype == KV_FP8:
            return kv_fp8.paged_attention_fp8_reference(q, k_cache, v_cache, block_tables, context_lens,
                                                        query_start_loc, sliding_window, k_scale, v_scale)
        if not self._reference and max_query_len == 1 and q.shape[0] == block_tables.shape[0]:
            # Pure decode, one token per sequence: one batched call (cpu_ops.py)
            return cpu_ops.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, max_context_len,
                                                  sliding_window)
        return reference.paged_attention_reference(q, k_cache, v_cache, block_tables, context_lens,
                                                   query_start_loc, sliding_window)

    def dense_prefill_supported(self, q: torch.Tensor, sliding_window: int | None) -> bool:
        """Whether ``dense_prefill_attention`` can serve q's device and dtype at all (lengths aside): the fast
        kernels on q's device, bf16/fp16, no sliding window, ``dense_prefill`` on."""
        return (self._dense_prefill and self.triton_on(q) and sliding_window is None
                and q.dtype in (torch.bfloat16, torch.float16))

    def dense_prefill_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int],
                                sliding_window: int | None = None, min_tokens: int | None = None
                                ) -> torch.Tensor | None:
        """Causal attention of fresh prompts over their own new tokens only: q [N, H, hd], k/v [N, KV, hd], the
        sequences back to back with ``seq_lens`` (host ints) new tokens each -> [N, H, hd]; or None where the
        paged kernel should run instead (``dense_prefill_supported`` says no, a prompt shorter than
        ``min_tokens`` (default ``DENSE_PREFILL_MIN_TOKENS``), or autograd). GQA without repeated K/V
        (``enable_gqa``); the caller has already stored K/V in the paged cache for later steps."""
        min_tokens = DENSE_PREFILL_MIN_TOKENS if min_tokens is None else min_tokens
        if (not self.dense_prefill_supported(q, sliding_window) or not seq_lens or min(seq_lens) < min_tokens
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

    # ----------------------------------------------------------------- small ops
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [..., D], weight [D] -> weight * rmsnorm(x) [..., D]; see ``reference.rms_norm_reference``."""
        if self.triton_on(x) and _no_autograd(x, weight):
            from mixtral.kernels.triton.rmsnorm import rms_norm

            return rms_norm(x, weight, eps, self._pdl)
        return reference.rms_norm_reference(x, weight, eps)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual [..., D] -> (rms_norm(x + residual), x + residual): a block's residual add and the next
        norm in one kernel; see ``reference.add_rms_norm_reference``."""
        if (self.triton_on(x) and x.dtype == residual.dtype and x.shape == residual.shape
                and _no_autograd(x, residual, weight)):
            from mixtral.kernels.triton.rmsnorm import add_rms_norm

            return add_rms_norm(x, residual, weight, eps, self._pdl)
        return reference.add_rms_norm_reference(x, residual, weight, eps)

    def rope_qk(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [N, H, hd], k [N, KV, hd], cos/sin [N, hd] -> rotated (q, k); see ``reference.rope_qk_reference``.
        The Triton kernel needs one dtype for all four (the model's case); mixed dtypes take the reference."""
        if (self.triton_on(q) and len({q.dtype, k.dtype, cos.dtype, sin.dtype}) == 1
                and _no_autograd(q, k, cos, sin)):
            from mixtral.kernels.triton.rope import rope_qk

            return rope_qk(q, k, cos, sin, pdl=self._pdl)
        if not self._reference:
            return cpu_ops.rope_qk(q, k, cos, sin)
        return reference.rope_qk_reference(q, k, cos, sin)

    def rope_qk_store(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      kv_scales: tuple[float, float] = (1.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
        """``rope_qk`` then ``write_kv`` of the rotated k and v at ``slot_mapping`` (-1 skips; an FP8 cache
        stores codes of k / kv_scales[0], v / kv_scales[1]): one Triton kernel when ``rope_qk``'s kernel applies
        and the cache holds k's dtype or FP8 codes, the two steps otherwise."""
        if (self.triton_on(q) and len({q.dtype, k.dtype, v.dtype, cos.dtype, sin.dtype}) == 1
                and k_cache.dtype in (k.dtype, KV_FP8) and _no_autograd(q, k, v, cos, sin)):
            from mixtral.kernels.triton.rope import rope_qk

            return rope_qk(q, k, cos, sin, cache=(v, k_cache, v_cache, slot_mapping), kv_scales=kv_scales,
                           pdl=self._pdl)
        q, k = self.rope_qk(q, k, cos, sin)
        self.write_kv(k, v, k_cache, v_cache, slot_mapping, *kv_scales)
        return q, k

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [M, K] @ weight [N, K]^T -> [M, N]: the Triton weight-streaming kernel for decode-sized M at
        inference in 2-byte dtypes (kernels/triton/skinny_gemm.py), else ``F.linear`` (as ``logits`` does it)."""
        if (self.triton_on(x) and x.dim() == 2 and x.shape[0] <= SKINNY_MAX_ROWS and x.dtype == weight.dtype
                and x.dtype in (torch.bfloat16, torch.float16) and _no_autograd(x, weight)):
            from mixtral.kernels.triton.skinny_gemm import skinny_gemm

            return skinny_gemm(x, weight, pdl=self._pdl)
        return self.logits(x, weight)

    def logits(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The lm_head: x [..., D] @ weight [V, D]^T -> [..., V]. ``F.linear``, except a bf16 Parameter on a CPU
        at inference: through its prepacked copy (``cpu_ops.PackedWeights``: bitwise the same, up to 2.6x faster
        at decode sizes)."""
        if self._packed is not None and cpu_ops.packable(x, weight):
            return self._packed.linear(x, weight)
        return torch.nn.functional.linear(x, weight)

    # ----------------------------------------------------------------- MoE
    def route_topk(self, router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """router_logits [N, E] -> (weights [N, k] fp32, ids [N, k] int64); see ``reference.route_topk``."""
        if self.triton_on(router_logits) and _no_autograd(router_logits):
            from mixtral.kernels.triton.router import route_topk_fused

            return route_topk_fused(router_logits, top_k, self._pdl)
        return reference.route_topk(router_logits, top_k)

    def gate_route(self, x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, counts: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The MoE router: x [N, D], gate_weight [E, D] -> (logits [N, E] in x's dtype, weights [N, k] fp32,
        ids [N, k] int64), and ``counts`` [E] int64 += each expert's choices (rows with ``mask`` [N] == 0 left
        out). One Triton kernel at decode sizes with ``fused_gate`` (kernels/triton/gate_router.py); else the
        Linear, ``route_topk`` and an ``index_add``."""
        if (self._fused_gate and self.triton_on(x) and x.shape[0] <= GATE_FUSED_MAX_TOKENS
                and x.dtype == gate_weight.dtype and gate_weight.shape[0] <= 64 and _no_autograd(x, gate_weight)):
            from mixtral.kernels.triton.gate_router import gate_route_fused

            return gate_route_fused(x, gate_weight, top_k, counts, mask, self._pdl)
        logits = torch.nn.functional.linear(x, gate_weight)  # [N, E]
        weights, ids = self.route_topk(logits, top_k)
        if counts is not None:
            reference.count_choices(counts, ids, mask)
        return logits, weights, ids

    def sorted_config(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> MoEConfig | None:
        """The tiles ``moe_experts`` runs the sorted-row TMA GEMMs with, or None where it does not take them
        (the caller checked Triton): from ``SORTED_MIN_TOKENS`` tokens, 2-byte dtypes, sm90+ and shapes that
        fit the tiles; ``moe_prefill='persistent'`` forces persistent tiles."""
        if x.shape[0] < SORTED_MIN_TOKENS or x.element_size() != 2 or not _sm90(x.device):
            return None
        from mixtral.kernels.triton import moe_configs
        from mixtral.kernels.triton.sorted_moe import layout_problem

        cfg = moe_configs.get_sorted_config(w13.shape[0], w2.shape[2], x.shape[1], x.shape[0], x.dtype, x.device)
        if self._persistent:
            cfg = _all_persistent(cfg)
        return cfg if layout_problem(x, w13, w2, cfg) is None else None

    def moe_experts(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor, expert_start: int = 0) -> torch.Tensor:
        """The experts of a MoE layer: x [N, D], w13 [E_local, 2F, D], w2 [E_local, D, F], topk_weights [N, k]
        fp32, topk_ids [N, k] global ids -> [N, D]. With Triton: the sorted-row GEMMs for prefill-sized token
        counts (``sorted_config``, unless ``moe_prefill='triton'``), else the decode kernel; elsewhere (or
        under autograd, or with weights in another dtype than x) ``moe_grouped``, or ``moe_reference`` with the
        reference backend."""
        if not (self.triton_on(x) and x.dtype == w13.dtype == w2.dtype and _no_autograd(x, w13, w2)):
            return self._moe_fallback(x, w13, w2, topk_weights, topk_ids, expert_start)
        cfg = self.sorted_config(x, w13, w2) if self._sorted else None
        if cfg is not None:
            from mixtral.kernels.triton.sorted_moe import sorted_moe

            return sorted_moe(x, w13, w2, topk_weights, topk_ids, expert_start, config=cfg, pdl=self._pdl)
        from mixtral.kernels.triton.fused_moe import fused_moe

        return fused_moe(x, w13, w2, topk_weights, topk_ids, expert_start, pdl=self._pdl)

    # ----------------------------------------------------------------- quantized weights
    def quant_linear(self, method: QuantMethod, x: torch.Tensor, t: QuantTensors) -> torch.Tensor:
        """x [M, in] times a quantized weight [out, in] (``method``'s stored tensors ``t``) -> [M, out] in x's
        dtype: the method's reference with the reference backend, its Triton kernel where Triton serves x's
        device (no autograd), else its PyTorch path (quant/base.py lists the entry points)."""
        if self._reference:
            return method.reference_linear(x, t)
        if method.triton_linear is not None and self.triton_on(x) and _no_autograd(x):
            return method.triton_linear(x, t, pdl=self._pdl)
        return method.torch_linear(x, t)

    def quant_moe(self, method: QuantMethod, x: torch.Tensor, w13: QuantTensors, w2: QuantTensors,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor, expert_start: int = 0) -> torch.Tensor:
        """``moe_experts``'s contract with quantized experts (w13 logical [E, 2F, D], w2 logical [E, D, F] as
        ``method``'s stored tensors; w2 may be in another format of the same family, e.g. a GGUF layer's Q6_K
        down projections beside Q4_K gate/up): the paths of ``quant_linear``."""
        if self._reference:
            return method.reference_moe(x, w13, w2, topk_weights, topk_ids, expert_start)
        if method.triton_moe is not None and self.triton_on(x) and _no_autograd(x):
            return method.triton_moe(x, w13, w2, topk_weights, topk_ids, expert_start, pdl=self._pdl)
        return method.torch_moe(x, w13, w2, topk_weights, topk_ids, expert_start)


@functools.lru_cache(maxsize=1)
def default_kernels() -> Kernels:
    """The ``KernelConfig()`` dispatch a layer holds until its model is given a config (or when built alone)."""
    return Kernels(KernelConfig())

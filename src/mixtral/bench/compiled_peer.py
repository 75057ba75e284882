"""A gpt-fast style decode peer for ``mixtral bench gpu --peer compiled``: what ``torch.compile`` alone makes of
Mixtral, on our weights.

The technique is gpt-fast's (a static KV cache per layer, one decode step written in plain PyTorch and compiled
whole with ``mode="reduce-overhead"``, i.e. Inductor kernels replayed from a CUDA graph): the experts are
indexed per token (``w13[ids]``), which Inductor turns into GEMVs that read only the chosen experts' rows, so at
batch 1 a step reads the two experts it needs and nothing is copied. Nothing here is shared with the engine
but the weight tensors (views, no second copy), so the figure is the compiler's, not our kernels'.

A prompt is prefilled uncompiled and not timed: its experts run ``moe_reference`` (one GEMM per expert; the
per-token indexing would copy [T, k, 2F, D] weights), attention through SDPA over the static cache. Norms,
RoPE and routing are ``kernels/reference.py``'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mixtral.kernels.reference import moe_reference, rms_norm_reference, rope_reference, route_topk
from mixtral.model.args import ModelArgs
from mixtral.model.layers import rope_cos_sin


class StaticCacheMixtral(torch.nn.Module):
    """Mixtral over a static KV cache of ``batch`` rows and ``max_len`` positions, on the weights of ``model``
    (our ``Transformer``). ``forward(ids [B, T], input_pos [T]) -> logits of the last position [B, V]``."""

    def __init__(self, model: torch.nn.Module, margs: ModelArgs, batch: int, max_len: int) -> None:
        super().__init__()
        self.m, self.a = model, margs
        dev, dt = model.device, model.dtype
        # Buffers, so the compiled step sees them as static inputs it may mutate: [layers, B, KV, L, hd]
        shape = (len(model.layers), batch, margs.n_kv_heads, max_len, margs.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, device=dev, dtype=dt), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, device=dev, dtype=dt), persistent=False)
        cos, sin = rope_cos_sin(torch.arange(max_len, device=dev), margs.head_dim, margs.rope_theta, dt)
        self.register_buffer("cos", cos, persistent=False)  # [L, hd]
        self.register_buffer("sin", sin, persistent=False)
        self.register_buffer("causal", torch.ones(max_len, max_len, dtype=torch.bool, device=dev).tril(),
                             persistent=False)  # [L, L]

    def _moe(self, h: torch.Tensor, layer: torch.nn.Module, decode: bool) -> torch.Tensor:
        """h [N, D] -> [N, D]: Mixtral's routing, then the chosen experts: indexed per token when ``decode``
        (gpt-fast's form, which Inductor fuses into the GEMVs), else the reference's one GEMM per expert."""
        ff = layer.feed_forward
        weights, ids = route_topk(F.linear(h, ff.gate.weight), self.a.num_experts_per_tok)  # [N, k] each
        if not decode:  # prefill, not timed: [N, k, 2F, D] weight copies would not fit
            return moe_reference(h, ff.w13, ff.w2, weights, ids)
        f = ff.w2.shape[-1]
        w13, w2 = ff.w13[ids], ff.w2[ids]  # [N, k, 2F, D], [N, k, D, F]
        gate_up = torch.einsum("nd,nkod->nko", h, w13)  # [N, k, 2F]
        act = F.silu(gate_up[..., :f]) * gate_up[..., f:]  # [N, k, F]
        y = torch.einsum("nkf,nkdf->nkd", act, w2)  # [N, k, D]
        return torch.einsum("nkd,nk->nd", y.float(), weights).to(h.dtype)

    def forward(self, ids: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        a, m = self.a, self.m
        b, t = ids.shape
        x = m.tok_embeddings(ids)  # [B, T, D]
        cos, sin = self.cos[input_pos], self.sin[input_pos]  # [T, hd]
        mask = self.causal[input_pos][None, None]  # [1, 1, T, L]
        for i, layer in enumerate(m.layers):
            h = rms_norm_reference(x, layer.attention_norm.weight, a.norm_eps)
            q, k, v = F.linear(h, layer.attention.wqkv.weight).split([a.q_size, a.kv_size, a.kv_size], dim=-1)
            # RoPE on [B, T, heads, hd] (cos [T, hd] broadcasts over B and heads), then heads first
            q = rope_reference(q.view(b, t, a.n_heads, a.head_dim), cos, sin).transpose(1, 2)  # [B, H, T, hd]
            k = rope_reference(k.view(b, t, a.n_kv_heads, a.head_dim), cos, sin).transpose(1, 2)  # [B, KV, T, hd]
            self.k_cache[i][:, :, input_pos] = k
            self.v_cache[i][:, :, input_pos] = v.view(b, t, a.n_kv_heads, a.head_dim).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, self.k_cache[i], self.v_cache[i], attn_mask=mask,
                                               enable_gqa=True)  # [B, H, T, hd]
            x = x + F.linear(o.transpose(1, 2).reshape(b, t, a.q_size), layer.attention.wo.weight)
            h = rms_norm_reference(x, layer.ffn_norm.weight, a.norm_eps)
            x = x + self._moe(h.view(b * t, -1), layer, decode=t == 1).view(b, t, -1)
        return m.output(rms_norm_reference(x[:, -1], m.norm.weight, a.norm_eps))  # [B, V]


def greedy_decode(peer: StaticCacheMixtral, prompts: torch.Tensor, steps: int,
                  step_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Prefill ``prompts`` [B, P] then ``steps`` greedy tokens; -> [B, steps]. ``step_fn`` (the compiled
    one-token forward) replaces ``peer`` for the decode steps."""
    step = peer if step_fn is None else step_fn
    p = prompts.shape[1]
    with torch.no_grad():
        tok = peer(prompts, torch.arange(p, device=prompts.device)).argmax(-1, keepdim=True)  # [B, 1]
        out = [tok]
        for s in range(steps - 1):
            tok = step(tok, torch.tensor([p + s], device=prompts.device)).argmax(-1, keepdim=True)
            out.append(tok.clone())  # a CUDA-graph replay reuses its output buffer
    return torch.cat(out, dim=1)


def bench_compiled_decode(model: torch.nn.Module, margs: ModelArgs, prompts: torch.Tensor, steps: int) -> float:
    """Decode tok/s of the compiled peer for ``prompts`` [B, P]: time(steps + 1 tokens) - time(1 token), after
    a run that compiles (one compilation per batch size: static shapes, as gpt-fast)."""
    b, p = prompts.shape
    peer = StaticCacheMixtral(model, margs, b, p + steps + 8)
    step_fn = torch.compile(peer, mode="reduce-overhead", fullgraph=True)

    def run(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        greedy_decode(peer, prompts, n, step_fn)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(4)  # compiles and records the graph
    return b * steps / max(run(steps + 1) - run(1), 1e-9)

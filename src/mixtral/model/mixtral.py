"""The Mixtral decoder: embeddings, N blocks of (attention, sparse MoE), final norm, lm_head.

Two entry points:
- ``model(input_ids [B, T]) -> logits [B, T, V]``: full sequences, no cache (parity tests, training);
- ``model.forward_tokens(tokens [N], ctx) -> hidden [N, D]`` then ``model.compute_logits``: flat ragged
  tokens whose attention is decided by a context (see model/context.py); the engine uses this.
Which implementation runs each fused op is the model's ``KernelConfig`` (``Transformer(args, kernels)`` or
``set_kernel_config``): one ``kernels/dispatch.Kernels`` object that every layer holds and calls.
Internal parameter names (the loaders map checkpoint names onto these):
``tok_embeddings``, ``layers.i.{attention_norm, attention.wqkv, attention.wo, ffn_norm,
feed_forward.gate, feed_forward.w13, feed_forward.w2}``, ``norm``, ``output``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mixtral.kernels.config import KernelConfig
from mixtral.kernels.dispatch import Kernels, default_kernels
from mixtral.model.args import ModelArgs
from mixtral.model.context import AttentionContext, DenseContext
from mixtral.model.layers import Attention, RMSNorm, rope_cos_sin
from mixtral.model.moe import MoE


def _no_reduce(x: torch.Tensor) -> torch.Tensor:
    return x


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int, ep_rank: int = 0, ep_size: int = 1) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, layer_idx)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = MoE(args, layer_idx, ep_rank, ep_size)
        self.kernels: Kernels = default_kernels()
        # Sums a rank's partial attention / MoE output over the tensor-parallel group (distributed/reduce.py).
        self.all_reduce: Callable[[torch.Tensor], torch.Tensor] = _no_reduce

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block's input hidden state is ``x + residual`` (just ``x`` when ``residual`` is None).

        Returns (moe_out, h, router_logits): the block's output hidden state is ``h + moe_out``, left unsummed
        so the next block (or the final norm) adds it inside its norm kernel: one launch and one [N, D] round
        trip less per layer. The sums are the same bf16 additions as summing here, so results are identical.
        """
        if residual is None:
            h = x
            normed = self.attention_norm(x)
        else:
            normed, h = self.kernels.add_rms_norm(x, residual, self.attention_norm.weight, self.attention_norm.eps)
        attn_out = self.all_reduce(self.attention(normed, cos, sin, ctx))  # [N, D]
        # h = h + attn_out, then ffn_norm(h): one kernel on CUDA at inference (Kernels.add_rms_norm).
        normed, h = self.kernels.add_rms_norm(h, attn_out, self.ffn_norm.weight, self.ffn_norm.eps)
        moe_out, router_logits = self.feed_forward(normed, ctx)
        return self.all_reduce(moe_out), h, router_logits


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, kernels: KernelConfig | None = None, ep_rank: int = 0,
                 ep_size: int = 1) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i, ep_rank, ep_size) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.kernels: Kernels = default_kernels()
        if kernels is not None:
            self.set_kernel_config(kernels)

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def set_kernel_config(self, config: KernelConfig) -> None:
        """Choose the implementation of every fused op: one ``Kernels`` built from ``config`` replaces the one
        each module holds (every module with a ``kernels`` attribute, so layers added later, e.g. adapters or
        quantized linears, get it too). Raises ValueError where the config cannot run on the model's device."""
        kernels = Kernels(config)
        kernels.check_device(self.device)
        for module in self.modules():
            if isinstance(getattr(module, "kernels", None), Kernels):
                module.kernels = kernels

    def forward_tokens(self, tokens: torch.Tensor, ctx: AttentionContext,
                       router_logits: list[torch.Tensor] | None = None) -> torch.Tensor:
        """tokens [N] -> final-normed hidden states [N, D]. Appends each layer's [N, E] router logits to
        ``router_logits`` when a list is given (training's aux loss)."""
        x = self.tok_embeddings(tokens)  # [N, D]
        cos, sin = rope_cos_sin(ctx.positions, self.args.head_dim, self.args.rope_theta, x.dtype)  # [N, hd]
        residual: torch.Tensor | None = None  # hidden state = x + residual (see TransformerBlock.forward)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x, residual, logits = checkpoint(layer, x, cos, sin, ctx, residual, use_reentrant=False)
            else:
                x, residual, logits = layer(x, cos, sin, ctx, residual)
            if router_logits is not None:
                router_logits.append(logits)
        if residual is None:  # no layers
            return self.norm(x)
        return self.kernels.add_rms_norm(x, residual, self.norm.weight, self.norm.eps)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., D] -> logits [..., V] in the model dtype."""
        return self.kernels.logits(hidden, self.output.weight)  # F.linear; prepacked for bf16 on a CPU

    def forward(self, input_ids: torch.Tensor, router_logits: list[torch.Tensor] | None = None
                ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] over full causal sequences (no cache)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        ctx = DenseContext(b, t, input_ids.device, self.args.sliding_window)
        hidden = self.forward_tokens(input_ids.reshape(-1), ctx, router_logits)  # [B*T, D]
        return self.compute_logits(hidden).view(b, t, -1)


def init_random_weights(model: Transformer, seed: int = 0, std: float = 0.02) -> None:
    """Fill a model with reproducible random weights (presets, tests, benchmarks): N(0, std), norms at 1."""
    gens: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            # Generate on the parameter's own device: filling 8x7B through the CPU would take minutes.
            gen = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
            p.copy_(torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32).mul_(std))

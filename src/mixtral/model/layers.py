"""Building blocks of the Mixtral decoder: RMSNorm, rotary embedding, attention.

Linear weights are stored [out, in] like every checkpoint. Attention keeps q, k and v in one fused
``wqkv`` [(H + 2*KV) * hd, D] so one GEMM serves all three; tensor parallelism shards it by heads
(each rank owns H/tp query heads and KV/tp key/value heads), which the loader does per slice.
RoPE uses the Hugging Face "rotate_half" layout; the consolidated loader permutes Mistral's rows.
Each layer calls its fused ops through ``self.kernels`` (``kernels/dispatch.Kernels``), which the model sets
once (``Transformer.set_kernel_config``). Quantized models swap ``wqkv`` and ``wo`` for ``QuantLinear`` modules
(model/quantized.py) and set ``quantized``; the layer then calls them, and they ask the same ``Kernels``.
"""

from __future__ import annotations

import torch
from torch import nn

from mixtral.kernels.dispatch import Kernels, default_kernels
from mixtral.model.args import ModelArgs
from mixtral.model.context import AttentionContext


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.kernels: Kernels = default_kernels()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back, then scale (the order transformers and Mistral use): one fused kernel
        # on CUDA at inference, kernels/reference.py's rms_norm_reference elsewhere.
        return self.kernels.rms_norm(x, self.weight, self.eps)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [N] -> cos, sin [N, hd] in ``dtype`` (computed in fp32, as transformers does)."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).float() / head_dim
    )  # [hd/2]
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [N, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [N, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int, tp_size: int = 1) -> None:
        super().__init__()
        if args.n_heads % tp_size or args.n_kv_heads % tp_size:
            raise ValueError(
                f"tensor-parallel size {tp_size} must divide n_heads ({args.n_heads}) "
                f"and n_kv_heads ({args.n_kv_heads})"
            )
        self.layer_idx = layer_idx
        self.head_dim = args.head_dim
        self.n_heads = args.n_heads // tp_size  # local to this rank
        self.n_kv_heads = args.n_kv_heads // tp_size
        self.q_size = self.n_heads * self.head_dim
        self.kv_size = self.n_kv_heads * self.head_dim
        self.rope_theta = args.rope_theta
        self.wqkv = nn.Linear(args.dim, self.q_size + 2 * self.kv_size, bias=False)
        self.wo = nn.Linear(self.q_size, args.dim, bias=False)
        self.kernels: Kernels = default_kernels()
        self.quantized = False  # wqkv / wo are QuantLinear modules (model/quantized.py)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext
                ) -> torch.Tensor:
        n = x.shape[0]
        # kernels.linear: a weight-streaming Triton kernel at decode sizes on CUDA (LoRA's parametrised weight
        # included: .weight is W + delta while an adapter is attached).
        # Quantized: the QuantLinear asks kernels.quant_linear (one flag test; the bf16 path is unchanged).
        qkv = self.wqkv(x) if self.quantized else self.kernels.linear(x, self.wqkv.weight)  # [N, (H + 2KV) * hd]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.n_heads, self.head_dim)  # [N, H, hd]
        k = k.view(n, self.n_kv_heads, self.head_dim)  # [N, KV, hd]
        v = v.view(n, self.n_kv_heads, self.head_dim)
        rope_attend = getattr(ctx, "rope_attend", None)
        if rope_attend is not None:  # the engine's paged context: RoPE and the K/V store are one kernel
            out = rope_attend(self.layer_idx, q, k, v, cos, sin)  # [N, H, hd]
        else:
            # one fused kernel for q and k on CUDA at inference (kernels.rope_qk)
            q, k = self.kernels.rope_qk(q, k, cos, sin)
            out = ctx.attend(self.layer_idx, q, k, v)  # [N, H, hd]
        out = out.reshape(n, self.q_size)  # [N, H * hd]
        return self.wo(out) if self.quantized else self.kernels.linear(out, self.wo.weight)

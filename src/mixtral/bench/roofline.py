"""The physical limits a benchmark figure is compared with: bytes a decode step must read, FLOPs a prefill
must do, and the GPU's measured copy bandwidth and matmul rate.

Pure arithmetic on ModelArgs plus two small measurements; no engine here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from mixtral.model.args import ModelArgs

# Dense bf16 tensor-core peak from NVIDIA's datasheets (SXM parts, no sparsity), FLOP/s.
DATASHEET_BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def expected_experts_hit(num_tokens: int, num_experts: int, top_k: int) -> float:
    """Expected number of distinct experts a layer reads for ``num_tokens`` tokens under uniform routing.

    Each token misses a given expert with probability 1 - k/E, so E * (1 - (1 - k/E)^N) experts are hit.
    Example: 8 experts, top-2: 1 token -> 2, 8 tokens -> 7.2, 32 tokens -> ~8.
    """
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** num_tokens)


@dataclass(frozen=True)
class StepBytes:
    weights: float  # bytes of weights the step must read
    kv: float  # bytes of KV cache the step must read

    @property
    def total(self) -> float:
        return self.weights + self.kv


def decode_step_bytes(args: ModelArgs, batch: int, context_len: int, dtype_bytes: int = 2) -> StepBytes:
    """Minimum bytes one decode step of ``batch`` sequences at ``context_len`` tokens must read from HBM."""
    counts = args.num_parameters()
    expert_params = 3 * args.dim * args.hidden_dim
    hit = expected_experts_hit(batch, args.num_experts, args.num_experts_per_tok)
    non_expert = counts["total"] - counts["experts"] - counts["embeddings"] // 2  # input embeddings: B rows only
    weights = (non_expert + args.n_layers * hit * expert_params + batch * args.dim) * dtype_bytes
    kv = batch * context_len * args.kv_bytes_per_token(dtype_bytes)
    return StepBytes(weights=float(weights), kv=float(kv))


def decode_roofline_tok_s(args: ModelArgs, batch: int, context_len: int, bandwidth: float,
                          dtype_bytes: int = 2) -> float:
    """Tokens/s if a decode step took exactly its bytes / bandwidth."""
    return batch / (decode_step_bytes(args, batch, context_len, dtype_bytes).total / bandwidth)


def prefill_flops(args: ModelArgs, num_tokens: int) -> float:
    """FLOPs of a causal prefill of one ``num_tokens`` prompt: active matmuls + attention + one lm_head row."""
    d, hd = args.dim, args.head_dim
    attn_proj = d * (args.q_size + 2 * args.kv_size) + args.q_size * d
    experts = args.num_experts_per_tok * 3 * d * args.hidden_dim
    router = d * args.num_experts
    per_token = 2 * args.n_layers * (attn_proj + experts + router)
    # QK^T and PV over the causal half: 2 matmuls * 2 FLOP * T^2/2 * H * hd per layer.
    attention = 2 * args.n_layers * num_tokens * num_tokens * args.n_heads * hd
    return float(per_token * num_tokens + attention + 2 * d * args.vocab_size)


def measure_copy_bandwidth(device: torch.device, nbytes: int = 2 << 30, iters: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), best of ``iters``."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(iters):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / best


def measure_matmul_flops(device: torch.device, n: int = 8192, iters: int = 10) -> float:
    """bf16 n x n x n matmul rate in FLOP/s, best of ``iters``."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    a @ b  # warm-up: cuBLAS picks its kernel
    best = float("inf")
    for _ in range(iters):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def datasheet_peak(device_name: str) -> float | None:
    for key, peak in DATASHEET_BF16_PEAK.items():
        if key in device_name:
            return peak
    return None

"""The physical limits a benchmark figure is compared with: bytes a decode step must read, FLOPs a prefill
must do, and the GPU's measured copy bandwidth and matmul rate.

A decode step's bytes depend on how the weights are stored: :class:`WeightFormat` gives the bytes per parameter
of the quantizable parts (attention projections, experts: codes plus their scales / zero points, as
``model/footprint.py`` counts a load) and of the parts that stay in the model dtype (router, norms, embeddings,
lm_head); the KV cache is read at its own element size (``--kv-cache-dtype``).

Pure arithmetic on ModelArgs plus two small measurements; no engine here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from mixtral.model.args import ModelArgs

# Dense tensor-core peaks from NVIDIA's datasheets (SXM parts, no sparsity), FLOP/s.
DATASHEET_BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
DATASHEET_FP8_PEAK = {"H100": 1978.9e12, "H200": 1978.9e12}


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


@dataclass(frozen=True)
class WeightFormat:
    """Bytes per parameter as loaded, by part: ``attention`` (wqkv, wo) and ``experts`` (w13, w2), which the
    quantization schemes store as codes plus scales (fp8: 1 + 4 / in_features; int4 at group 128 with fp16
    scales: 0.5 + 2 / 128), and ``dense``: the router, norms, embeddings and lm_head, always in the model dtype."""

    attention: float = 2.0
    experts: float = 2.0
    dense: float = 2.0

    @classmethod
    def plain(cls, dtype_bytes: float) -> WeightFormat:
        """Every weight in one float dtype of ``dtype_bytes``."""
        return cls(dtype_bytes, dtype_bytes, dtype_bytes)

    @classmethod
    def from_footprint(cls, args: ModelArgs, parts: dict[str, int], dtype_bytes: float) -> WeightFormat:
        """From ``model.footprint.weight_bytes``' parts of the model ``args`` (the bytes a load allocates)."""
        counts = args.num_parameters()
        return cls(attention=parts["attention"] / counts["attention"], experts=parts["experts"] / counts["experts"],
                   dense=dtype_bytes)


def decode_step_bytes(args: ModelArgs, batch: int, context_len: int, dtype_bytes: float = 2,
                      fmt: WeightFormat | None = None, kv_dtype_bytes: float | None = None) -> StepBytes:
    """Minimum bytes one decode step of ``batch`` sequences at ``context_len`` tokens must read from HBM: every
    attention, router and norm weight, the lm_head, ``batch`` rows of the input embeddings, the experts the
    batch is expected to hit, and the KV cache. ``fmt``: how the weights are stored (default: all in
    ``dtype_bytes``); ``kv_dtype_bytes``: the KV cache's element size (default: ``dtype_bytes``)."""
    fmt = fmt or WeightFormat.plain(dtype_bytes)
    counts = args.num_parameters()
    expert_params = 3 * args.dim * args.hidden_dim
    hit = expected_experts_hit(batch, args.num_experts, args.num_experts_per_tok)
    dense = counts["total"] - counts["experts"] - counts["attention"] - counts["embeddings"] // 2  # + lm_head
    weights = (counts["attention"] * fmt.attention + args.n_layers * hit * expert_params * fmt.experts
               + (dense + batch * args.dim) * fmt.dense)  # input embeddings: B rows only
    kv = batch * context_len * args.kv_bytes_per_token(1) * (dtype_bytes if kv_dtype_bytes is None else kv_dtype_bytes)
    return StepBytes(weights=float(weights), kv=float(kv))


def decode_roofline_tok_s(args: ModelArgs, batch: int, context_len: int, bandwidth: float,
                          dtype_bytes: float = 2, fmt: WeightFormat | None = None,
                          kv_dtype_bytes: float | None = None) -> float:
    """Tokens/s if a decode step took exactly its bytes / bandwidth."""
    step = decode_step_bytes(args, batch, context_len, dtype_bytes, fmt, kv_dtype_bytes)
    return batch / (step.total / bandwidth)


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


def datasheet_peak(device_name: str, compute: str = "bf16") -> float | None:
    """The datasheet's dense peak of ``device_name`` for ``compute`` ("bf16" or "fp8") matmuls; None if unknown."""
    table = DATASHEET_FP8_PEAK if compute == "fp8" else DATASHEET_BF16_PEAK
    for key, peak in table.items():
        if key in device_name:
            return peak
    return None

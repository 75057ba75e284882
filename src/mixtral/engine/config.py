"""EngineConfig: the serving engine's knobs (vLLM's names), validated on construction.

Model-independent limits live here; ``resolve`` fills the ones that depend on the model (max_model_len
defaults to the model's context length). KV cache sizing itself is in ``engine/memory.py``. Which kernel runs
each op is ``kernels: KernelConfig`` (defined in ``kernels/config.py``, below the model, which receives it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from mixtral.kernels.config import KernelConfig

# Default KV cache budget on CPU, where there is no "free memory" to take a fraction of.
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
# --kv-cache-dtype values (vLLM's names): "auto" stores K/V in the model's dtype; "fp8" (alias "fp8_e4m3")
# stores float8_e4m3fn codes with one K and one V scale per layer (kernels/kv_fp8.py).
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
KV_FP8_DTYPE = torch.float8_e4m3fn


@dataclass
class EngineConfig:
    """Limits of one engine.

    - ``block_size``: token slots per KV block.
    - ``max_model_len``: longest sequence (prompt + output); None = the model's context length.
    - ``max_num_seqs``: sequences running at once (batch size of a decode step).
    - ``max_num_batched_tokens``: tokens one forward pass may process (the chunked-prefill budget).
    - ``gpu_memory_utilization``: fraction of the GPU's memory the engine may take (weights + activations + KV).
    - ``kv_cache_bytes``: explicit KV budget in bytes (the CPU's way; also overrides the GPU fraction).
    - ``num_kv_blocks``: explicit number of KV blocks (tests use it to force preemption).
    - ``enable_prefix_caching``: reuse full KV blocks of equal prefixes.
    - ``enforce_eager``: never capture CUDA graphs (decode steps, and the prefill graph below).
    - ``prefill_cuda_graph``: on CUDA, also capture one graph for a single sequence's chunk of exactly
      ``max_num_batched_tokens`` new tokens (a lone long prompt's full chunks); it holds a second activation
      peak of memory, which the KV budget leaves room for. False skips it.
    - ``async_scheduling``: launch the next decode step before the current step's tokens reach the host, so
      the host's scheduling and output work overlaps the GPU (vLLM's "async scheduling"). None = on for
      CUDA, off elsewhere (where the host computes the model itself and nothing overlaps).
    - ``freeze_gc_heap``: while the engine has requests, keep the garbage collector off the objects that existed
      when it got them (``gc.freeze``, undone when it is idle again: engine/gc_freeze.py), so a full collection
      walks what serving allocates instead of the whole process (100+ ms stalls of the step loop otherwise).
      None = on for CUDA, off elsewhere (where the CPU computes the model and nothing waits for the host).
    - ``seed``: draws the per-request seeds of requests that bring none.
    - ``kernels``: which implementation runs each fused op (``KernelConfig``: backend, MoE prefill path, dense
      prefill attention, fused router, PDL); the model runner hands it to the model once.
    - ``kv_cache_dtype``: "auto" (the model's dtype) or "fp8" / "fp8_e4m3" (float8_e4m3fn codes: twice the tokens
      in the same bytes; kept as "fp8"). vLLM's ``--kv-cache-dtype``.
    - ``kv_cache_scales``: per layer (k_scale, v_scale) of an FP8 cache: a stored code c stands for c * scale.
      None = 1.0 for every layer (vLLM's default), unless the checkpoint carries scales
      (``LLMEngine.from_config`` reads them; kernels/kv_fp8.py says why 1.0 is the default). Fixed once the
      engine is built: CUDA graphs bake them in.
    """

    block_size: int = 16
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    gpu_memory_utilization: float = 0.9
    kv_cache_bytes: int | None = None
    num_kv_blocks: int | None = None
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    prefill_cuda_graph: bool = True
    async_scheduling: bool | None = None
    freeze_gc_heap: bool | None = None
    seed: int = 0
    device: torch.device | None = None
    dtype: torch.dtype | None = None
    kernels: KernelConfig = field(default_factory=KernelConfig)
    kv_cache_dtype: str = "auto"
    kv_cache_scales: tuple[tuple[float, float], ...] | None = None

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        for name in ("block_size", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "kv_cache_bytes",
                     "num_kv_blocks"):
            positive(name)
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.device is not None:
            self.device = torch.device(self.device)
        if not isinstance(self.kernels, KernelConfig):
            raise ValueError(f"kernels must be a KernelConfig, got {self.kernels!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(map(repr, KV_CACHE_DTYPES))}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.kv_cache_dtype == "fp8_e4m3":
            self.kv_cache_dtype = "fp8"
        if self.kv_cache_scales is not None:
            self.kv_cache_scales = _check_scales(self.kv_cache_scales)

    def cache_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype the KV cache tensors hold for a model computing in ``model_dtype``."""
        return KV_FP8_DTYPE if self.kv_cache_dtype == "fp8" else model_dtype

    def resolve(self, model_max_len: int) -> EngineConfig:
        """Fill model-dependent defaults and check the limits against each other."""
        max_len = self.max_model_len or model_max_len
        if max_len > model_max_len:
            raise ValueError(
                f"max_model_len={max_len} exceeds the model's context length {model_max_len}; "
                f"lower --max-model-len"
            )
        return dataclasses.replace(self, max_model_len=max_len)


def _check_scales(scales: object) -> tuple[tuple[float, float], ...]:
    """Per-layer (k_scale, v_scale) pairs as a tuple of float pairs (a JSON list of lists is accepted: the
    parallel workers get the config that way); each scale finite and positive."""
    try:
        pairs = tuple((float(k), float(v)) for k, v in scales)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"kv_cache_scales must be (k_scale, v_scale) pairs, one per layer, got {scales!r}") from exc
    for i, pair in enumerate(pairs):
        if not all(math.isfinite(s) and s > 0 for s in pair):
            raise ValueError(f"kv_cache_scales[{i}] = {pair}: scales must be finite and positive")
    return pairs

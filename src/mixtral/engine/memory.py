"""KV cache sizing: how many blocks the budget allows.

A block's bytes count the cache's element size: ``EngineConfig.kv_cache_dtype="fp8"`` stores 1 byte per
element, so the same budget holds twice the blocks of a bf16 cache (four times an fp32 one).

- An explicit ``num_kv_blocks`` wins (tests force preemption with it).
- An explicit ``kv_cache_bytes`` is divided by the bytes of one block (the CPU's way, or a fixed GPU budget).
- On CUDA otherwise: ``gpu_memory_utilization`` of the device's total memory, minus what is in use after the
  weights are loaded (after collecting garbage: engines dropped earlier in the process), minus the activation
  peak of a warm-up forward pass at ``max_num_batched_tokens``.
- On CPU otherwise: ``DEFAULT_CPU_KV_CACHE_BYTES``, but never more than all sequences at full length need.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from mixtral.engine.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from mixtral.model.args import ModelArgs


class InsufficientMemoryError(RuntimeError):
    """The budget leaves no room for even one sequence of max_model_len tokens."""


def block_bytes(args: ModelArgs, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one KV block takes over all layers (K and V)."""
    return block_size * args.kv_bytes_per_token(torch.empty((), dtype=dtype).element_size())


def plan_num_blocks(config: EngineConfig, args: ModelArgs, dtype: torch.dtype, device: torch.device,
                    profile_activation_bytes: Callable[[], int] | None = None) -> int:
    """Number of KV blocks to allocate for a model computing in ``dtype`` (the cache holds
    ``config.cache_dtype(dtype)``). ``profile_activation_bytes`` runs the warm-up pass (CUDA only)."""
    assert config.max_model_len is not None, "resolve() the config first"
    per_block = block_bytes(args, config.block_size, config.cache_dtype(dtype))
    blocks_per_seq = -(-config.max_model_len // config.block_size)
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    if config.kv_cache_bytes is not None:
        budget, source = config.kv_cache_bytes, f"kv_cache_bytes={config.kv_cache_bytes}"
    elif device.type == "cuda":
        # An engine dropped earlier in this process (a benchmark's previous configuration, a test's) is a
        # reference cycle: its KV cache stays allocated until the cycle collector runs, and would be counted
        # as in use here (its 0.9 of the GPU left the next engine nothing).
        gc.collect()
        activation = profile_activation_bytes() if profile_activation_bytes is not None else 0
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        budget = int(total * config.gpu_memory_utilization) - used - activation
        source = (f"gpu_memory_utilization={config.gpu_memory_utilization} of {total / 2**30:.1f} GiB, "
                  f"{used / 2**30:.1f} GiB in use after loading, {activation / 2**30:.2f} GiB activation peak")
    else:
        cap = blocks_per_seq * config.max_num_seqs * per_block
        budget, source = min(DEFAULT_CPU_KV_CACHE_BYTES, cap), "the default CPU KV budget"
    num_blocks = max(budget, 0) // per_block
    if num_blocks < blocks_per_seq:
        raise InsufficientMemoryError(
            f"KV cache budget ({source}) holds {num_blocks} blocks of {config.block_size} tokens "
            f"({per_block} bytes each), but one sequence of max_model_len={config.max_model_len} needs "
            f"{blocks_per_seq}. Raise the budget (--gpu-memory-utilization / --kv-cache-bytes) or lower "
            f"--max-model-len."
        )
    return num_blocks


# --------------------------------------------------------------------------- before loading
MemoryProbe = Callable[[torch.device], tuple[int, str]]


def available_memory(device: torch.device) -> tuple[int, str]:
    """(bytes the device can still give, where that figure comes from). CUDA: free memory of that GPU; CPU:
    the kernel's MemAvailable (what can be allocated without swapping), else the free physical pages."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free, f"free memory of {device} ({torch.cuda.get_device_name(device)})"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available RAM (MemAvailable)"
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free RAM"


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_model_fits(args: ModelArgs, dtype: torch.dtype, device: torch.device, *, name: str = "the model",
                     max_model_len: int | None = None, probe: MemoryProbe | None = None,
                     weight_bytes: int | None = None, scheme: str | None = None) -> None:
    """Fail at once, before any weight is allocated, when the weights plus the KV cache of one
    ``max_model_len``-token sequence exceed what ``device`` has: the error gives both numbers and the ways out
    (the OS would otherwise kill the process part-way through loading, or CUDA fail with an opaque OOM).
    ``weight_bytes``: what the weights take when quantized (model/footprint.py; default: every parameter in
    ``dtype``), ``scheme`` its name for the message."""
    element = torch.empty((), dtype=dtype).element_size()
    weights = args.num_parameters()["total"] * element if weight_bytes is None else weight_bytes
    seq_len = max_model_len or args.max_seq_len
    kv = args.kv_bytes_per_token(element) * seq_len
    need = weights + kv
    have, where = (probe or available_memory)(device)
    if need <= have:
        return
    raise InsufficientMemoryError(
        f"{name} does not fit: it needs {_gib(need)} ({_gib(weights)} of "
        f"{scheme or str(dtype).removeprefix('torch.')} weights + {_gib(kv)} of KV cache for one "
        f"{seq_len}-token sequence), but {where} is {_gib(have)}. "
        f"Ways out: quantized weights (--quantization fp8, or int8 / int4), more GPUs (--tensor-parallel-size N), "
        f"a smaller --max-model-len (the KV part), or a smaller model."
    )

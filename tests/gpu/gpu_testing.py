"""Shared pieces of the GPU tests: error measures, tolerances, random inputs, paged-KV batches, graph capture.

Plain functions and constants (imported as ``from gpu_testing import ...``, as tests/engine does with
engine_testing); the fixtures (the CUDA device, the kernel-choice switch, model builders) are in conftest.py.
Nothing here touches CUDA at import, so the suite collects on a CPU machine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

# Relative Frobenius error ||out - ref|| / ||ref|| a kernel may show against the fp32 reference computed from
# the same inputs: about one rounding of the output in the 2-byte dtypes; fp32 needs IEEE dots (conftest sets
# TRITON_F32_DEFAULT=ieee), TF32 would be ~1e-3.
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3, torch.float32: 1e-4}
# About one rounding step of each dtype (elementwise, relative to 1 + |ref|): the small ops' criterion.
STEP = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-5}
NAME = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0
          ) -> torch.Tensor:
    """N(0, scale^2) drawn in fp32 on ``gen``'s device, then cast (the same values for every dtype)."""
    return (torch.randn(*shape, device=gen.device, generator=gen) * scale).to(dtype)


def within_steps(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, steps: int = 2
                 ) -> tuple[bool, float]:
    """(every element finite and within ``steps`` rounding steps of ref, scaled by 1 + |ref|; max |out - ref|).

    Two steps, not one, for the norms: the normalised value is rounded to the dtype and then multiplied by the
    weight and rounded again, so a one-step difference before the weight can become two after it (seen on an
    H100: fp16, 24 of 1M elements at 2 steps)."""
    diff = (out.double() - ref.double()).abs()
    ok = bool(torch.isfinite(out).all()) and bool((diff <= steps * STEP[dtype] * (1 + ref.double().abs())).all())
    return ok and out.dtype == ref.dtype, diff.max().item()


def paged_batch(gen: torch.Generator, q_lens: list[int], ctx_lens: list[int], n_heads: int, n_kv: int,
                head_dim: int, block_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """A ragged attention batch over paged K/V: (q [N, H, hd], k_cache, v_cache [blocks, block_size, KV, hd],
    block_tables [S, max_blocks] int32, context_lens [S] int32, query_start_loc [S + 1] int32), each sequence's
    blocks scattered over a shuffled pool with spare blocks, so a wrong table lookup reads someone else's keys."""
    dev = gen.device
    per_seq = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(per_seq) + 7
    pool = torch.randperm(num_blocks, device=dev, generator=gen).to(torch.int32)
    tables = torch.zeros(len(ctx_lens), max(per_seq), dtype=torch.int32, device=dev)  # [S, max_blocks]
    used = 0
    for i, nb in enumerate(per_seq):
        tables[i, :nb] = pool[used:used + nb]
        used += nb
    k_cache = randn(gen, num_blocks, block_size, n_kv, head_dim, dtype=dtype)
    v_cache = randn(gen, num_blocks, block_size, n_kv, head_dim, dtype=dtype)
    q = randn(gen, sum(q_lens), n_heads, head_dim, dtype=dtype)  # [N, H, hd]
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    lens = torch.tensor(ctx_lens, dtype=torch.int32, device=dev)
    return q, k_cache, v_cache, tables, lens, starts


def capture(fn: Callable[[], T]) -> tuple[torch.cuda.CUDAGraph, T]:
    """Run ``fn`` once on a side stream (Triton compiles there, outside the capture), then capture it as one
    CUDA graph: (the graph, the outputs its replays overwrite)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize()
    return graph, out

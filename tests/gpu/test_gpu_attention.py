"""Attention kernels on a GPU against ``paged_attention_reference`` computed in fp32 from the same inputs.

- the paged Triton kernels (``triton/paged_attention.py``: split-K decode and ragged prefill) at Mixtral's
  head layouts (8x7B: 32 query / 8 KV heads, 8x22B: 48 / 8; head_dim 128) in bf16, fp16 and fp32: batch
  1..512, contexts across block boundaries, a graph bound four times the longest context, ragged prefill
  after cached prefixes, block size 8, a sliding window;
- ``write_kv`` (exact, padding slots skipped);
- the cuDNN prefill (``Kernels.dense_prefill_attention``) in bf16 and fp16, and where it must decline (fp32, a
  sliding window, short prompts, ``KernelConfig(dense_prefill=False)``) so the paged kernel runs instead.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from gpu_testing import TOL, paged_batch, randn, rel_err

from mixtral.kernels.config import KernelConfig
from mixtral.kernels.dispatch import DENSE_PREFILL_MIN_TOKENS, Kernels
from mixtral.kernels.reference import paged_attention_reference, write_kv_reference

pytestmark = pytest.mark.gpu

HEADS = {"8x7b": (32, 8), "8x22b": (48, 8)}  # query heads, KV heads; head_dim 128
MAX_CTX = 2048
EDGES = [1, 15, 16, 17, 255, 256, 257, MAX_CTX]  # block boundaries (block size 16) and the longest context
CASES = [(m, dt) for m in HEADS for dt in (torch.bfloat16, torch.float16)] + [("8x7b", torch.float32)]


def check(kernels: SimpleNamespace, gen: torch.Generator, q_lens: list[int], ctx_lens: list[int],
          heads: tuple[int, int], dtype: torch.dtype, block_size: int = 16, bound: int | None = None,
          window: int | None = None) -> None:
    """The Triton kernel on a random paged batch against the fp32 reference on the same numbers."""
    q, kc, vc, bt, cl, qsl = paged_batch(gen, q_lens, ctx_lens, *heads, 128, block_size, dtype)
    out = kernels.paged_attention.paged_attention(q, kc, vc, bt, cl, qsl, max_query_len=max(q_lens),
                                                  max_context_len=bound or max(ctx_lens), sliding_window=window)
    ref = paged_attention_reference(q.float(), kc.float(), vc.float(), bt, cl, qsl, window)
    err = rel_err(out, ref)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert err < TOL[dtype], f"{len(ctx_lens)} seqs, q {q_lens[:8]}, ctx {ctx_lens[:8]}: rel err {err:.2e}"


def lengths(seed: int, n: int, hi: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, hi + 1, (n,), generator=g).tolist()


@pytest.mark.parametrize(("model", "dtype"), CASES)
@pytest.mark.parametrize("batch", [1, 8, 64, 512])
def test_decode(kernels: SimpleNamespace, gen: torch.Generator, model: str, dtype: torch.dtype, batch: int) -> None:
    """One new token per sequence; contexts at the block edges first, then random (split-K at small batch)."""
    ctx = (EDGES + lengths(batch, batch, MAX_CTX))[:batch]
    check(kernels, gen, [1] * batch, ctx, HEADS[model], dtype)


@pytest.mark.parametrize(("model", "dtype"), CASES)
def test_decode_under_a_larger_graph_bound(kernels: SimpleNamespace, gen: torch.Generator, model: str,
                                           dtype: torch.dtype) -> None:
    """A CUDA graph sizes the launch from max_model_len, far above the running contexts."""
    check(kernels, gen, [1] * 4, EDGES[-4:], HEADS[model], dtype, bound=4 * MAX_CTX)


@pytest.mark.parametrize(("model", "dtype"), CASES)
def test_prefill_ragged_after_cached_prefixes(kernels: SimpleNamespace, gen: torch.Generator, model: str,
                                              dtype: torch.dtype) -> None:
    q_lens = [1, 15, 16, 17, 100, 512]
    ctx = [q + p for q, p in zip(q_lens, lengths(7, len(q_lens), 300), strict=True)]
    check(kernels, gen, q_lens, ctx, HEADS[model], dtype)


@pytest.mark.parametrize(("model", "dtype"), CASES)
def test_prefill_fresh_prompt(kernels: SimpleNamespace, gen: torch.Generator, model: str, dtype: torch.dtype) -> None:
    check(kernels, gen, [2048], [2048], HEADS[model], dtype)


@pytest.mark.parametrize(("model", "dtype"), CASES)
def test_block_size_8_and_sliding_window(kernels: SimpleNamespace, gen: torch.Generator, model: str,
                                         dtype: torch.dtype) -> None:
    check(kernels, gen, [7, 33], [7, 90], HEADS[model], dtype, block_size=8)
    check(kernels, gen, [40, 1], [300, 280], HEADS[model], dtype, window=100)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_write_kv_exact(kernels: SimpleNamespace, gen: torch.Generator, dtype: torch.dtype) -> None:
    """k/v as strided views of a fused qkv row, every 7th slot -1 (padding): stored exactly, nothing else moves."""
    n, kv, blocks, bs = 300, 8, 64, 16
    qkv = randn(gen, n, 32 + 2 * kv, 128, dtype=dtype)  # [N, H + 2 KV, hd]
    k, v = qkv[:, 32:32 + kv], qkv[:, 32 + kv:]
    slots = torch.randperm(blocks * bs, device=gen.device, generator=gen)[:n]
    slots[::7] = -1
    caches = [randn(gen, blocks, bs, kv, 128, dtype=dtype) for _ in range(2)]
    expect = [c.clone() for c in caches]
    kernels.write_kv.write_kv(k, v, caches[0], caches[1], slots)
    write_kv_reference(k, v, expect[0], expect[1], slots)
    assert torch.equal(caches[0], expect[0]) and torch.equal(caches[1], expect[1])


def causal_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
    """Each prompt's causal attention over its own tokens, in fp32 with K/V repeated per query group."""
    out, start, group = [], 0, q.shape[1] // k.shape[1]
    for n in seq_lens:
        rows = slice(start, start + n)
        qi = q[rows].float().transpose(0, 1)  # [H, n, hd]
        ki = k[rows].float().repeat_interleave(group, dim=1).transpose(0, 1)
        vi = v[rows].float().repeat_interleave(group, dim=1).transpose(0, 1)
        out.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=True).transpose(0, 1))
        start += n
    return torch.cat(out)  # [N, H, hd]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model", list(HEADS))
def test_dense_prefill(kernel_ops: Kernels, gen: torch.Generator, dtype: torch.dtype, model: str) -> None:
    """Two fresh prompts back to back through cuDNN's SDPA (GQA without repeated K/V)."""
    h, kv = HEADS[model]
    seq_lens = [2048, 1536]
    q = randn(gen, sum(seq_lens), h, 128, dtype=dtype)
    k, v = (randn(gen, sum(seq_lens), kv, 128, dtype=dtype) for _ in range(2))
    with torch.inference_mode():
        out = kernel_ops.dense_prefill_attention(q, k, v, seq_lens, min_tokens=1024)
    assert out is not None, "the dense path declined a bf16/fp16 prompt above its threshold"
    err = rel_err(out, causal_reference(q, k, v, seq_lens))
    assert out.dtype == dtype and err < TOL[dtype], f"rel err {err:.2e}"


def test_dense_prefill_declines_where_the_paged_kernel_must_run(kernel_ops: Kernels, gen: torch.Generator) -> None:
    """fp32 prompts, a sliding window, prompts under the threshold, or the choice off: None (the caller then
    runs the paged kernel, which the tests above hold to the reference in fp32 too)."""
    q16, k16 = randn(gen, 2048, 32, 128, dtype=torch.bfloat16), randn(gen, 2048, 8, 128, dtype=torch.bfloat16)
    q32, k32 = q16.float(), k16.float()
    assert DENSE_PREFILL_MIN_TOKENS > 2048  # the eager threshold (4096 tokens) that the fourth call relies on
    with torch.inference_mode():
        assert kernel_ops.dense_prefill_attention(q16, k16, k16, [2048], min_tokens=1024) is not None
        assert kernel_ops.dense_prefill_attention(q32, k32, k32, [2048], min_tokens=1024) is None
        assert kernel_ops.dense_prefill_attention(q16, k16, k16, [2048], sliding_window=512, min_tokens=1024) is None
        assert kernel_ops.dense_prefill_attention(q16, k16, k16, [2048]) is None  # eager threshold: 4096 tokens
        off = Kernels(KernelConfig(dense_prefill=False))
        assert off.dense_prefill_attention(q16, k16, k16, [2048], min_tokens=1024) is None

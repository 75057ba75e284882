"""Paged attention (prefill, split-K decode) and write_kv Triton kernels against kernels/reference.py,
on CPU through the interpreter."""

from __future__ import annotations

import pytest
import torch

from mixtral.kernels.config import KernelConfig
from mixtral.kernels.dispatch import Kernels
from mixtral.kernels.reference import paged_attention_reference, write_kv_reference
from mixtral.kernels.triton import paged_attention as pa
from mixtral.kernels.triton import write_kv as wk


def _paged_batch(q_lens: list[int], ctx_lens: list[int], n_heads: int, n_kv: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """Random q and caches, each sequence's blocks scattered over a shuffled pool (tables padded with 0)."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(blocks_per_seq) + 3
    pool = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(ctx_lens), max(blocks_per_seq), dtype=torch.int32)  # [S, max_blocks]
    used = 0
    for i, nb in enumerate(blocks_per_seq):
        tables[i, :nb] = pool[used:used + nb]
        used += nb
    k_cache = torch.randn(num_blocks, block_size, n_kv, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, n_kv, head_dim, generator=gen).to(dtype)
    q = torch.randn(sum(q_lens), n_heads, head_dim, generator=gen).to(dtype)  # [N, H, hd]
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)  # [S + 1]
    return q, k_cache, v_cache, tables, torch.tensor(ctx_lens, dtype=torch.int32), qsl


def _check(q_lens: list[int], ctx_lens: list[int], n_heads: int, n_kv: int, head_dim: int, block_size: int,
           dtype: torch.dtype, window: int | None = None, seed: int = 0, max_context_len: int | None = None) -> None:
    q, kc, vc, bt, cl, qsl = _paged_batch(q_lens, ctx_lens, n_heads, n_kv, head_dim, block_size, dtype, seed)
    out = pa.paged_attention(q, kc, vc, bt, cl, qsl, max_query_len=max(q_lens),
                             max_context_len=max_context_len or max(ctx_lens), sliding_window=window)
    ref = paged_attention_reference(q.double(), kc.double(), vc.double(), bt, cl, qsl, window)
    assert out.dtype == dtype and torch.isfinite(out).all()
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 2e-3), err


@pytest.mark.parametrize(("q_lens", "ctx_lens", "n_heads", "n_kv", "head_dim", "block_size"), [
    ([5, 1, 9], [5, 12, 9], 4, 2, 16, 4),  # fresh prompts, a decode row, a prompt after a cached prefix
    ([17, 3], [40, 3], 6, 2, 8, 16),  # QG = 3 (not a power of two), head_dim 8 (< one tile), block 16
    ([33], [70], 4, 4, 32, 16),  # no GQA grouping; a chunked-prefill chunk over a cached prefix
    ([2, 0, 3], [19, 7, 3], 8, 2, 16, 8),  # a sequence with no new tokens in the batch
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_matches_reference(q_lens: list[int], ctx_lens: list[int], n_heads: int, n_kv: int, head_dim: int,
                                   block_size: int, dtype: torch.dtype) -> None:
    _check(q_lens, ctx_lens, n_heads, n_kv, head_dim, block_size, dtype, seed=sum(ctx_lens))


def test_long_prefill_matches_reference() -> None:
    """>= 1024 rows (tokens x QG) take the 128-row tiles; a 140-token cached prefix takes the unmasked loop."""
    _check([260, 3], [400, 9], 4, 1, 16, 16, torch.float16, seed=99)


@pytest.mark.parametrize(("ctx_lens", "block_size", "max_context_len"), [
    ([1, 16, 17, 31], 16, None),  # block boundaries, one partition (no split: short contexts)
    ([300, 5], 16, None),  # split into 64-key partitions; the short sequence uses one
    ([700, 64, 513], 4, None),  # several partitions, a context ending exactly on one
    ([90, 30], 8, 1000),  # launch bound larger than the true lengths (as in a captured CUDA graph)
    ([2200], 16, None),  # 35 partitions: the merge takes them in two chunks
])
def test_decode_matches_reference(ctx_lens: list[int], block_size: int, max_context_len: int | None) -> None:
    _check([1] * len(ctx_lens), ctx_lens, 8, 2, 16, block_size, torch.float16, seed=len(ctx_lens),
           max_context_len=max_context_len)


@pytest.mark.parametrize(("q_lens", "ctx_lens", "window"), [
    ([20, 5], [40, 5], 8),  # prefill with a window shorter than the prompt
    ([1, 1], [700, 30], 100),  # split decode: early partitions fully outside the window
])
def test_sliding_window_matches_reference(q_lens: list[int], ctx_lens: list[int], window: int) -> None:
    _check(q_lens, ctx_lens, 4, 2, 16, 8, torch.float32, window=window, seed=window)


def test_int64_metadata() -> None:
    """Engines may keep lengths, starts and slots in int64: same results as int32."""
    q, kc, vc, bt, cl, qsl = _paged_batch([4, 1], [9, 30], 4, 2, 16, 4, torch.float32, 21)
    for max_q in (4, 1):
        rows = slice(None) if max_q == 4 else slice(4, 5)
        qs = q[rows]
        starts = qsl if max_q == 4 else torch.tensor([0, 0, 1], dtype=torch.int32)  # decode: the 1-token sequence
        lens = cl
        out32 = pa.paged_attention(qs, kc, vc, bt, lens, starts, max_query_len=max_q, max_context_len=30)
        out64 = pa.paged_attention(qs, kc, vc, bt.long(), lens.long(), starts.long(), max_query_len=max_q,
                                   max_context_len=30)
        assert torch.equal(out32, out64)
        ref = paged_attention_reference(qs, kc, vc, bt, lens, starts)
        assert torch.allclose(out32, ref, atol=1e-5)
    k, v = torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    slots = torch.tensor([5, -1, 0])
    caches = [torch.zeros(2, 4, 2, 16) for _ in range(2)]
    wk.write_kv(k, v, caches[0], caches[1], slots.long())
    assert torch.equal(caches[0][1, 1], k[0]) and torch.equal(caches[1][0, 0], v[2])


def test_decode_partition_size() -> None:
    assert pa.decode_partition_size(64, 8, 4096, 132) is None  # 512 programs already fill the GPU
    assert pa.decode_partition_size(1, 8, 64, 132) is None  # one tile: nothing to split
    assert pa.decode_partition_size(1, 8, 2048, 132) == 64  # 32 splits x 8 heads: about two waves
    # A CUDA graph's bound is max_model_len: capped, so a short running context still splits 4 ways.
    assert pa.decode_partition_size(1, 8, 32768, 132) == 128
    size = pa.decode_partition_size(16, 8, 4096, 132)
    assert size is not None and size % 64 == 0 and 128 < size <= 512


def test_write_kv_matches_reference() -> None:
    gen = torch.Generator().manual_seed(11)
    qkv = torch.randn(9, 4 + 2 * 2, 16, generator=gen)  # [N, H + 2KV, hd]: k/v are strided views
    k, v = qkv[:, 4:6], qkv[:, 6:8]
    slots = torch.tensor([3, 0, -1, 17, 9, -1, 30, 31, 12])
    caches = [torch.randn(8, 4, 2, 16, generator=gen).half() for _ in range(2)]
    expect = [c.clone() for c in caches]
    wk.write_kv(k, v, caches[0], caches[1], slots)
    write_kv_reference(k, v, expect[0], expect[1], slots)
    assert torch.equal(caches[0], expect[0]) and torch.equal(caches[1], expect[1])


def test_paged_attention_rejects_bad_shapes() -> None:
    q, kc, vc, bt, cl, qsl = _paged_batch([2], [4], 4, 2, 16, 4, torch.float32, 0)
    with pytest.raises(ValueError, match="query heads"):
        pa.paged_attention(q[:, :3], kc, vc, bt, cl, qsl, max_query_len=2, max_context_len=4)
    with pytest.raises(ValueError, match="query_start_loc"):
        pa.paged_attention(q, kc, vc, bt, cl, qsl[:1], max_query_len=2, max_context_len=4)


def test_dispatch_uses_kernels_when_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dispatch routes to the Triton kernels with the triton backend, to the reference with auto on a CPU
    tensor: same numbers."""
    q, kc, vc, bt, cl, qsl = _paged_batch([3, 1], [8, 6], 4, 2, 16, 4, torch.float32, 5)
    args = (q, kc, vc, bt, cl, qsl)
    calls: list[str] = []
    real = pa.paged_attention
    monkeypatch.setattr(pa, "paged_attention", lambda *a, **kw: calls.append("triton") or real(*a, **kw))
    ref = Kernels(KernelConfig()).paged_attention(*args, max_query_len=3, max_context_len=8)  # CPU -> reference
    assert calls == []
    out = Kernels(KernelConfig(backend="triton")).paged_attention(*args, max_query_len=3, max_context_len=8)
    assert calls == ["triton"]
    assert torch.allclose(out, ref, atol=1e-5)

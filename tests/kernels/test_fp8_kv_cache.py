"""FP8 KV cache (kernels/kv_fp8.py): the Triton K/V store (write_kv.py, rope.py's fused store) writes the
reference's e4m3 codes, and the paged attention kernels (prefill, split-K decode) read FP8 caches directly and
match attention over the dequantized caches; then the same through the dispatch and the engine's paged context
(the Triton backend against the reference backend); on CPU through Triton's interpreter."""

from __future__ import annotations

import pytest
import torch

from mixtral.engine.attention import PagedAttentionContext
from mixtral.kernels import kv_fp8
from mixtral.kernels.config import KernelConfig
from mixtral.kernels.dispatch import Kernels
from mixtral.kernels.reference import paged_attention_reference, rope_qk_reference
from mixtral.kernels.triton import paged_attention as pa
from mixtral.kernels.triton import rope
from mixtral.kernels.triton import write_kv as wk

FP8 = kv_fp8.KV_FP8


def _caches(num_blocks: int, block: int, kv: int, hd: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.zeros(num_blocks, block, kv, hd, dtype=FP8), torch.zeros(num_blocks, block, kv, hd, dtype=FP8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_write_kv_stores_the_reference_codes(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    k = (torch.randn(6, 2, 16, generator=gen) * 20).to(dtype)  # some values past 448 * 0.05: saturate
    v = (torch.randn(6, 2, 16, generator=gen) * 3).to(dtype)
    slots = torch.tensor([5, -1, 0, 17, 30, 2])
    got_k, got_v = _caches(4, 8, 2, 16)
    want_k, want_v = _caches(4, 8, 2, 16)
    wk.write_kv(k, v, got_k, got_v, slots, k_scale=0.05, v_scale=0.02)
    kv_fp8.write_kv_fp8_reference(k, v, want_k, want_v, slots, k_scale=0.05, v_scale=0.02)
    assert torch.equal(got_k.float(), want_k.float()) and torch.equal(got_v.float(), want_v.float())
    assert got_k.float().abs().max() == 448  # saturated, not inf or NaN


def test_rope_fused_store_stores_the_reference_codes() -> None:
    gen = torch.Generator().manual_seed(1)
    n, h, kv, hd = 3, 4, 2, 16
    q, k, v = (torch.randn(n, h, hd, generator=gen), torch.randn(n, kv, hd, generator=gen) * 4,
               torch.randn(n, kv, hd, generator=gen))
    angle = torch.rand(n, hd // 2, generator=gen) * 6
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    slots = torch.tensor([3, -1, 9])
    kc, vc = _caches(2, 8, kv, hd)
    q_rot, k_rot = rope.rope_qk(q, k, cos, sin, cache=(v, kc, vc, slots), kv_scales=(0.03, 0.01))
    want_q, want_k = rope_qk_reference(q, k, cos, sin)
    want_kc, want_vc = _caches(2, 8, kv, hd)
    kv_fp8.write_kv_fp8_reference(want_k, v, want_kc, want_vc, slots, 0.03, 0.01)
    assert torch.equal(q_rot, want_q) and torch.equal(k_rot, want_k)  # the rotation itself is unchanged
    assert torch.equal(kc.float(), want_kc.float()) and torch.equal(vc.float(), want_vc.float())


def _batch(q_lens: list[int], ctx_lens: list[int], n_heads: int, n_kv: int, hd: int, block: int, dtype, seed: int,
           k_scale: float, v_scale: float):
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-c // block) for c in ctx_lens]
    num_blocks = sum(blocks) + 2
    pool = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(ctx_lens), max(blocks), dtype=torch.int32)
    used = 0
    for i, nb in enumerate(blocks):
        tables[i, :nb] = pool[used:used + nb]
        used += nb
    k = torch.randn(num_blocks, block, n_kv, hd, generator=gen) * 3
    v = torch.randn(num_blocks, block, n_kv, hd, generator=gen)
    kc, vc = kv_fp8.quantize_kv(k, k_scale), kv_fp8.quantize_kv(v, v_scale)
    q = torch.randn(sum(q_lens), n_heads, hd, generator=gen).to(dtype)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, kc, vc, tables, torch.tensor(ctx_lens, dtype=torch.int32), qsl, (k, v)


@pytest.mark.parametrize(("q_lens", "ctx_lens", "dtype"), [
    ([5, 1, 9], [5, 12, 9], torch.float32),  # prefill kernel: fresh prompts, a decode row, a cached prefix
    ([1, 1, 1], [300, 17, 64], torch.float32),  # split-K decode
    ([1, 1], [40, 9], torch.float16),  # single-pass decode, fp16 queries
    ([7], [20], torch.float16),
])
def test_attention_reads_fp8_caches(q_lens: list[int], ctx_lens: list[int], dtype: torch.dtype) -> None:
    k_scale, v_scale = 0.05, 0.01  # K ~ 3 N(0, 1): |K| / 0.05 stays below 448
    q, kc, vc, bt, cl, qsl, (k, v) = _batch(q_lens, ctx_lens, 4, 2, 16, 8, dtype, seed=sum(ctx_lens),
                                            k_scale=k_scale, v_scale=v_scale)
    got = pa.paged_attention(q, kc, vc, bt, cl, qsl, max_query_len=max(q_lens), max_context_len=max(ctx_lens),
                             k_scale=k_scale, v_scale=v_scale)
    want = kv_fp8.paged_attention_fp8_reference(q, kc, vc, bt, cl, qsl, None, k_scale, v_scale)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 2e-3,
                               atol=1e-5 if dtype == torch.float32 else 2e-3)
    # And the FP8 cache stays near the unquantized one it stands for.
    exact = paged_attention_reference(q.float(), k, v, bt, cl, qsl)
    rel = ((got.float() - exact).norm() / exact.norm()).item()
    assert rel < 0.08, rel


def test_scale_helpers() -> None:
    assert kv_fp8.kv_scale_from_amax(44.8) == pytest.approx(0.1)
    codes = kv_fp8.quantize_kv(torch.tensor([1.0, -900.0, 0.3]), 2.0)
    assert kv_fp8.dequantize_kv(codes, 2.0).tolist() == [1.0, -896.0, 0.3125]  # 0.3 / 2 -> 0.15625: steps of 2^-6 there


# --------------------------------------------------------------------------- through the dispatch and the context
def _step_context(kernels: Kernels, caches: list, q_lens: list[int], ctx_lens: list[int], tables: torch.Tensor,
                  block: int, scales: list[tuple[float, float]]) -> PagedAttentionContext:
    """The engine's context for one step: sequence i has ctx_lens[i] tokens after it, the last q_lens[i] new."""
    positions = torch.cat([torch.arange(c - n, c) for n, c in zip(q_lens, ctx_lens, strict=True)])
    seq_of = torch.repeat_interleave(torch.arange(len(q_lens)), torch.tensor(q_lens))
    slots = tables[seq_of, positions // block].long() * block + positions % block
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return PagedAttentionContext(
        positions=positions, slot_mapping=slots, block_tables=tables,
        context_lens=torch.tensor(ctx_lens, dtype=torch.int32), query_start_loc=qsl, max_query_len=max(q_lens),
        max_context_len=max(ctx_lens), kv_caches=caches, kernels=kernels, kv_scales=scales)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_context_steps_with_the_triton_kernels_equal_the_reference(dtype: torch.dtype) -> None:
    """The engine's paged context over FP8 caches, one prefill step (a fresh prompt and a chunk after cached
    tokens) then a decode step: ``rope_attend`` (the fused RoPE + FP8 store) and ``attend`` through the Triton
    kernels (interpreted) store the same codes as the reference dispatch and attend to the same output."""
    gen = torch.Generator().manual_seed(5)
    h, kv, hd, block, layers = 4, 2, 16, 8, 2
    scales = [(0.02, 0.01), (1.0, 1.0)]  # layer 0: calibrated-looking scales; layer 1: the default
    tables = torch.tensor([[3, 0, 5], [1, 4, 2]], dtype=torch.int32)
    fast, ref = Kernels(KernelConfig(backend="triton")), Kernels(KernelConfig(backend="reference"))
    caches = {name: [_caches(6, block, kv, hd) for _ in range(layers)] for name in ("fast", "ref")}
    for q_lens, ctx_lens in (([9, 6], [9, 14]), ([1, 1], [10, 15])):  # prefill step, then decode
        n = sum(q_lens)
        q = torch.randn(n, h, hd, generator=gen).to(dtype)
        k = (torch.randn(n, kv, hd, generator=gen) * 3).to(dtype)
        v = torch.randn(n, kv, hd, generator=gen).to(dtype)
        angle = torch.rand(n, hd // 2, generator=gen) * 6
        cos, sin = (torch.cat([f(angle)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
        outs = {}
        for name, kernels in (("fast", fast), ("ref", ref)):
            ctx = _step_context(kernels, caches[name], q_lens, ctx_lens, tables, block, scales)
            outs[name] = (ctx.rope_attend(0, q, k, v, cos, sin), ctx.attend(1, q, k, v))
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        for got, want in zip(outs["fast"], outs["ref"], strict=True):
            assert got.dtype == dtype
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        for (fk, fv), (rk, rv) in zip(caches["fast"], caches["ref"], strict=True):
            assert fk.dtype == FP8
            assert torch.equal(fk.float(), rk.float()) and torch.equal(fv.float(), rv.float())


def test_dispatch_keeps_the_fused_rope_store_for_fp8_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    """``rope_qk_store`` takes the one-kernel path for an FP8 cache as for a cache in q's dtype, and falls back
    to RoPE then ``write_kv`` for a cache in yet another dtype (both store the same values)."""
    calls = []
    real = rope.rope_qk
    monkeypatch.setattr(rope, "rope_qk", lambda *a, **kw: calls.append("cache" in kw) or real(*a, **kw))
    fast = Kernels(KernelConfig(backend="triton"))
    gen = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(3, 4, 16, generator=gen), torch.randn(3, 2, 16, generator=gen), torch.randn(3, 2, 16,
                                                                                                    generator=gen)
    cos, sin = torch.ones(3, 16), torch.zeros(3, 16)
    slots = torch.tensor([0, 1, 2])
    kc, vc = _caches(1, 8, 2, 16)
    fast.rope_qk_store(q, k, v, cos, sin, kc, vc, slots, (0.5, 0.25))
    assert calls == [True]
    calls.clear()
    kc16, vc16 = (torch.zeros(1, 8, 2, 16, dtype=torch.float16) for _ in range(2))
    fast.rope_qk_store(q, k, v, cos, sin, kc16, vc16, slots)
    assert calls == [False]  # RoPE alone, then write_kv
    want_k, want_v = _caches(1, 8, 2, 16)
    kv_fp8.write_kv_fp8_reference(k, v, want_k, want_v, slots, 0.5, 0.25)  # cos 1, sin 0: k unrotated
    assert torch.equal(kc.float(), want_k.float()) and torch.equal(vc.float(), want_v.float())

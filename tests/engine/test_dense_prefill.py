"""The dense attention path for steps of fresh prompts: ``Kernels.dense_prefill_attention`` against the paged
reference, where it declines (``KernelConfig.dense_prefill`` off among the reasons), and which engine steps hand
it their prompt lengths."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from mixtral.engine.cuda_graphs import PrefillGraph
from mixtral.engine.llm_engine import LLMEngine
from mixtral.engine.model_runner import ModelRunner
from mixtral.kernels import dispatch
from mixtral.kernels.config import KernelConfig
from mixtral.kernels.dispatch import Kernels
from mixtral.kernels.reference import paged_attention_reference
from mixtral.sampling import SamplingParams

# The dispatch with the fast paths on for CPU tensors too (the triton backend): the dense path is PyTorch's SDPA,
# which runs anywhere; no Triton kernel is called by these tests.
FAST = Kernels(KernelConfig(backend="triton"))


def _ragged(lens: list[int], h: int = 4, kv: int = 2, hd: int = 16, block: int = 4, seed: int = 0
            ) -> tuple[torch.Tensor, ...]:
    """Fresh prompts of ``lens`` tokens: q/k/v [N, *, hd] fp16, and the same K/V in paged caches."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(lens)
    q, k, v = (torch.randn(n, heads, hd, generator=gen).half() for heads in (h, kv, kv))
    per_seq = [-(-m // block) for m in lens]
    k_cache = torch.zeros(sum(per_seq), block, kv, hd, dtype=torch.float16)
    v_cache = torch.zeros_like(k_cache)
    tables = torch.zeros(len(lens), max(per_seq), dtype=torch.int32)
    first_block, start = 0, 0
    for i, m in enumerate(lens):
        tables[i, :per_seq[i]] = torch.arange(first_block, first_block + per_seq[i])
        slots = tables[i, torch.arange(m) // block].long() * block + torch.arange(m) % block
        k_cache.view(-1, kv, hd)[slots] = k[start:start + m]
        v_cache.view(-1, kv, hd)[slots] = v[start:start + m]
        first_block, start = first_block + per_seq[i], start + m
    ctx = torch.tensor(lens, dtype=torch.int32)
    qsl = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, k_cache, v_cache, tables, ctx, qsl


def test_matches_the_paged_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two fresh prompts of different lengths, GQA 4/2: the dense path (PyTorch's math backend on CPU, which the
    triton backend lets it take) equals the paged reference over the same cache."""
    monkeypatch.setattr(dispatch, "DENSE_PREFILL_MIN_TOKENS", 8)
    lens = [13, 9]
    q, k, v, k_cache, v_cache, tables, ctx, qsl = _ragged(lens)
    got = FAST.dense_prefill_attention(q, k, v, lens)
    assert got is not None
    want = paged_attention_reference(q.float(), k_cache.float(), v_cache.float(), tables, ctx, qsl)
    torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=2e-3)


def test_declines_where_the_paged_kernel_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v, *_ = _ragged([12, 10])
    monkeypatch.setattr(dispatch, "DENSE_PREFILL_MIN_TOKENS", 8)
    assert Kernels(KernelConfig()).dense_prefill_attention(q, k, v, [12, 10]) is None  # CPU, auto: the reference
    monkeypatch.setattr(dispatch, "DENSE_PREFILL_MIN_TOKENS", 11)
    assert FAST.dense_prefill_attention(q, k, v, [12, 10]) is None  # one prompt below the threshold
    monkeypatch.setattr(dispatch, "DENSE_PREFILL_MIN_TOKENS", 8)
    assert FAST.dense_prefill_attention(q.float(), k.float(), v.float(), [12, 10]) is None  # fp32
    assert FAST.dense_prefill_attention(q, k, v, [12, 10], sliding_window=4) is None
    assert FAST.dense_prefill_attention(q, k, v, [12, 9]) is None  # lengths that do not cover q
    off = Kernels(KernelConfig(backend="triton", dense_prefill=False))
    assert off.dense_prefill_attention(q, k, v, [12, 10]) is None
    assert not off.dense_prefill_supported(q, None) and FAST.dense_prefill_supported(q, None)
    assert FAST.dense_prefill_attention(q, k, v, [12, 10]) is not None


def test_engine_passes_fresh_prompt_lengths_only(make_engine: Callable[..., LLMEngine],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A step of prompts with nothing cached before them offers their lengths; decode steps and a prompt
    whose prefix came from the prefix cache do not; outputs are unchanged (the CPU path declines)."""
    seen: list[list[int] | None] = []
    real = Kernels.dense_prefill_attention

    def record(self: Kernels, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int], *a: Any
               ) -> torch.Tensor | None:
        seen.append(list(lens))
        return real(self, q, k, v, lens, *a)

    monkeypatch.setattr(Kernels, "dense_prefill_attention", record)
    engine = make_engine(enable_prefix_caching=True, block_size=4)
    greedy = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    prompt = list(range(10, 30))
    engine.add_request("a", prompt, greedy)
    engine.add_request("b", list(range(40, 53)), greedy)
    while engine.has_unfinished_requests():
        engine.step()
    layers = engine.model_args.n_layers
    assert seen == [[20, 13]] * layers  # the one prefill step; decode steps offered nothing
    seen.clear()
    engine.add_request("c", [*prompt, 7, 8], greedy)  # 20 tokens' blocks are cached: not fresh
    while engine.has_unfinished_requests():
        engine.step()
    assert seen == []


def test_min_tokens_overrides_the_eager_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prefill graph passes a lower bound (its host cost is paid at capture); eager calls keep 4096."""
    q, k, v, *_ = _ragged([12, 10])
    assert FAST.dense_prefill_attention(q, k, v, [12, 10]) is None  # below DENSE_PREFILL_MIN_TOKENS
    assert FAST.dense_prefill_attention(q, k, v, [12, 10], min_tokens=10) is not None
    assert FAST.dense_prefill_attention(q, k, v, [12, 10], min_tokens=11) is None


def _graph(num_tokens: int, fresh: bool) -> PrefillGraph:
    """A PrefillGraph as its capture leaves it, without a GPU: only what ``fits`` reads."""
    g = PrefillGraph.__new__(PrefillGraph)
    g.graph, g.num_tokens, g.fresh = object(), num_tokens, fresh  # type: ignore[assignment]
    return g


def test_prefill_graph_choice() -> None:
    """A prompt's first full chunk replays the dense-attention graph, a later full chunk the paged one, other
    steps run eagerly; without the dense graph a first chunk takes the paged one."""
    paged, fresh = _graph(8, False), _graph(8, True)
    runner = SimpleNamespace(prefill_graph=paged, fresh_prefill_graph=fresh)
    one, two = SimpleNamespace(scheduled=[0]), SimpleNamespace(scheduled=[0, 1])
    first, later = SimpleNamespace(fresh_prompt_lens=[8]), SimpleNamespace(fresh_prompt_lens=None)
    choose = ModelRunner._prefill_graph_for
    assert choose(runner, one, 8, first) is fresh  # type: ignore[arg-type]
    assert choose(runner, one, 8, later) is paged  # type: ignore[arg-type]
    assert choose(runner, one, 7, first) is None  # type: ignore[arg-type]
    assert choose(runner, two, 8, SimpleNamespace(fresh_prompt_lens=[4, 4])) is None  # type: ignore[arg-type]
    runner.fresh_prefill_graph = None
    assert choose(runner, one, 8, first) is paged  # type: ignore[arg-type]

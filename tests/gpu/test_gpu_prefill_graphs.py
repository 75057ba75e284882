"""The engine's prefill CUDA graphs (``engine/cuda_graphs.PrefillGraph``): a lone sequence's chunk of exactly
``max_num_batched_tokens`` tokens replays a captured forward pass; a prompt's first chunk replays one whose
attention is cuDNN's (bf16/fp16). Held to what eager steps give:

- fp32: greedy tokens with the paged prefill graph equal the reference backend's, and the graph did replay;
- bf16: the fresh-prompt graph (cuDNN attention) and the paged graph give the same tokens as eager prefill
  steps that take the same attention kernels (the eager dense threshold lowered to the graph's).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

from mixtral.engine.cuda_graphs import PrefillGraph
from mixtral.engine.llm_engine import LLMEngine
from mixtral.kernels import dispatch
from mixtral.model.mixtral import Transformer
from mixtral.sampling import SamplingParams

pytestmark = pytest.mark.gpu


@pytest.fixture
def replays(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts of prefill-graph replays by kind ("fresh": dense attention, "paged"), from a wrapper on
    ``PrefillGraph.run``."""
    counts = {"fresh": 0, "paged": 0}
    run = PrefillGraph.run

    def counted(self: PrefillGraph, *a: Any, **k: Any) -> torch.Tensor:
        counts["fresh" if self.fresh else "paged"] += 1
        return run(self, *a, **k)

    monkeypatch.setattr(PrefillGraph, "run", counted)
    return counts


def generate(base: Transformer, kernel_choice: Callable[..., Any], prompts: list[list[int]], *, dtype: str,
             backend: str = "auto", one_at_a_time: bool = False, **engine_kwargs: Any
             ) -> tuple[list[list[int]], LLMEngine]:
    """Greedy tokens of each prompt (8 each) from an engine on a copy of ``base``; the engine comes back too."""
    model = copy.deepcopy(base)
    with kernel_choice(backend=backend) as kernels:
        engine = LLMEngine.from_config(model, device="cuda", dtype=dtype, max_num_seqs=8, num_kv_blocks=1024,
                                       seed=0, kernels=kernels, **engine_kwargs)
        out: dict[str, list[int]] = {}
        ids = [str(i) for i in range(len(prompts))]
        for batch in ([[i] for i in ids] if one_at_a_time else [ids]):
            for rid in batch:
                engine.add_request(rid, prompts[int(rid)], SamplingParams(temperature=0.0, max_tokens=8,
                                                                          ignore_eos=True))
            while engine.has_unfinished_requests():
                for o in engine.step():
                    if o.finished:
                        out[o.request_id] = list(o.outputs[0].token_ids)
    return [out[i] for i in ids], engine


def random_prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1000, vocab, (n,), generator=gen).tolist() for n in lengths]


def test_fp32_paged_prefill_graph_equals_reference(cuda: torch.device, build_model, mid_args, kernel_choice,
                                                    replays: dict[str, int]) -> None:
    base = build_model(mid_args, 0.05)
    prompts = random_prompts([700, 256, 520, 300], mid_args.vocab_size, seed=1)
    limits = dict(max_model_len=1024, max_num_batched_tokens=256)
    # One prompt at a time: each full 256-token chunk is a lone sequence's (6 of them), the rest run eagerly.
    ref, _ = generate(base, kernel_choice, prompts, dtype="fp32", backend="reference", one_at_a_time=True,
                      enforce_eager=True, async_scheduling=False, **limits)
    assert replays == {"fresh": 0, "paged": 0}
    fast, engine = generate(base, kernel_choice, prompts, dtype="fp32", one_at_a_time=True, **limits)
    runner = engine.model_runner
    assert runner.prefill_graph is not None and runner.fresh_prefill_graph is None  # no cuDNN path in fp32
    assert replays["paged"] >= 4, replays
    assert fast == ref


def test_bf16_prefill_graphs_equal_eager_prefill(cuda: torch.device, build_model, mid_args, kernel_choice,
                                                 replays: dict[str, int], monkeypatch: pytest.MonkeyPatch) -> None:
    base = build_model(mid_args, 0.05)
    # 2100 tokens: a fresh 1024-token chunk (dense graph), a 1024-token chunk after it (paged graph), 52 eager.
    prompts = random_prompts([2100, 1024], mid_args.vocab_size, seed=2)
    limits = dict(max_model_len=4096, max_num_batched_tokens=1024)
    graphs, engine = generate(base, kernel_choice, prompts, dtype="bf16", one_at_a_time=True, **limits)
    assert engine.model_runner.fresh_prefill_graph is not None
    assert replays["fresh"] >= 2 and replays["paged"] >= 1, replays
    del engine
    seen = dict(replays)
    # Eager prefill steps with the graph's attention choices: cuDNN for a fresh chunk from 1024 tokens.
    # (dispatch.Kernels.dense_prefill_attention reads the module's threshold at each call.)
    monkeypatch.setattr(dispatch, "DENSE_PREFILL_MIN_TOKENS", dispatch.GRAPH_DENSE_PREFILL_MIN_TOKENS)
    eager, _ = generate(base, kernel_choice, prompts, dtype="bf16", one_at_a_time=True, prefill_cuda_graph=False,
                        **limits)
    assert replays == seen, "the eager engine replayed a prefill graph"
    assert graphs == eager

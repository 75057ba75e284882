"""Helpers shared by the engine and generation tests (imported as a plain module; fixtures are in conftest.py).

The tiny model uses init std 0.2 (not the default 0.02) so greedy outputs are decisive and varied rather
than one token repeated. ``greedy_reference`` is the ground truth the engine is compared with: full
recomputation through the dense (cache-free) forward, one request at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from contiguous_kv import ContiguousKVCache, ContiguousKVContext

from mixtral.engine.llm_engine import LLMEngine
from mixtral.engine.outputs import RequestOutput
from mixtral.model.mixtral import Transformer, init_random_weights
from mixtral.model.presets import preset

ENGINE_STD = 0.2


def build_tiny_model(name: str = "tiny", seed: int = 0, std: float = ENGINE_STD) -> Transformer:
    model = Transformer(preset(name))
    init_random_weights(model, seed=seed, std=std)
    return model.eval()


def assert_no_leaks(engine: LLMEngine) -> None:
    bm = engine.block_manager
    bm.check_invariants()
    assert not engine.has_unfinished_requests(), "test left requests unfinished"
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert bm.num_free_blocks == bm.num_blocks, f"{bm.num_blocks - bm.num_free_blocks} KV blocks leaked"


def run_to_completion(engine: LLMEngine, check: Callable[[LLMEngine], None] | None = None
                      ) -> dict[str, RequestOutput]:
    """Step until every request finishes; return the final output of each. ``check`` runs after each step."""
    done: dict[str, RequestOutput] = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        if check is not None:
            check(engine)
        steps += 1
        assert steps < 10_000, "engine made no progress"
    return done


@torch.inference_mode()
def greedy_reference(model: Transformer, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens of one request through a contiguous (unpaged) KV cache: prefill, then one token a step."""
    args = model.args
    cache = ContiguousKVCache(args.n_layers, 1, len(prompt) + max_tokens, args.n_kv_heads, args.head_dim,
                              model.dtype, model.device)
    out: list[int] = []
    tokens, start = list(prompt), 0
    for _ in range(max_tokens):
        ctx = ContiguousKVContext(cache, start, len(tokens), sliding_window=args.sliding_window)
        hidden = model.forward_tokens(torch.tensor(tokens), ctx)  # [T, D]
        out.append(int(model.compute_logits(hidden[-1]).argmax()))
        start += len(tokens)
        tokens = [out[-1]]
    return out


def random_prompts(count: int, min_len: int, max_len: int, seed: int, vocab: int = 32768) -> list[list[int]]:
    """Token-id prompts of mixed lengths (ordinary ids: control tokens of v3 are < 10)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (count,), generator=gen).tolist()
    return [torch.randint(10, vocab, (n,), generator=gen).tolist() for n in lengths]

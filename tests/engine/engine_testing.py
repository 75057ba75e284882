"""Helpers shared by the engine and generation tests (imported as a plain module; fixtures are in conftest.py).

The tiny model uses init std 0.2 (not the default 0.02) so greedy outputs are decisive and varied rather
than one token repeated. ``greedy_reference`` is the ground truth the engine is compared with: full
recomputation through the dense (cache-free) forward, one request at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from contiguous_kv import ContiguousKVCache, ContiguousKVContext
from step_testing import run_to_completion as run_to_completion  # re-exported: the engine tests import it here

from mixtral.engine.llm_engine import LLMEngine
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


# (cache, start, new tokens) -> the attention context of one reference step
ReferenceContext = Callable[[ContiguousKVCache, int, int], ContiguousKVContext]


@torch.inference_mode()
def greedy_reference(model: Transformer, prompt: list[int], max_tokens: int,
                     context: ReferenceContext | None = None) -> list[int]:
    """Greedy tokens of one request through a contiguous (unpaged) KV cache: prefill, then one token a step.

    ``context`` builds each step's attention context (default: ``ContiguousKVContext`` with the model's sliding
    window); a subclass changes what the reference stores, e.g. K/V rounded as an FP8 cache would hold them."""
    args = model.args
    cache = ContiguousKVCache(args.n_layers, 1, len(prompt) + max_tokens, args.n_kv_heads, args.head_dim,
                              model.dtype, model.device)
    if context is None:
        def context(cache: ContiguousKVCache, start: int, n: int) -> ContiguousKVContext:
            return ContiguousKVContext(cache, start, n, sliding_window=args.sliding_window)

    out: list[int] = []
    tokens, start = list(prompt), 0
    for _ in range(max_tokens):
        ctx = context(cache, start, len(tokens))
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

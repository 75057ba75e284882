"""The engine over a tensor-parallel group gives the tokens of the engine in one process.

24 mixed requests (greedy, seeded sampling, n = 2, stop tokens, logprobs, shared prefixes) through the same
EngineConfig in one process and over TP 2, EP 2 and TP 2 x EP 2 (gloo, CPU): every token identical, the
prefix cache hit, prefill chunked (a 32-token budget), and, with a KV cache too small for the batch, sequences
preempted and recomputed. Async scheduling (steps launched on the device-side ids of the previous step, which
the driver broadcasts) is run too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tp_testing import mixed_requests, run_requests, token_ids

from mixtral.checkpoint.loader import load_model
from mixtral.distributed.engine import engine_over
from mixtral.distributed.executor import DistributedExecutor
from mixtral.engine.config import EngineConfig
from mixtral.engine.llm_engine import LLMEngine
from mixtral.sampling import SamplingParams
from mixtral.tokenizer import Tokenizer

SCENARIOS: dict[str, dict[str, Any]] = {
    "chunked-prefix": dict(max_model_len=160, max_num_seqs=8, max_num_batched_tokens=32, num_kv_blocks=256,
                           block_size=16),
    "preempt": dict(max_model_len=160, max_num_seqs=8, max_num_batched_tokens=64, num_kv_blocks=12, block_size=16),
    "async": dict(max_model_len=160, max_num_seqs=8, max_num_batched_tokens=128, num_kv_blocks=256,
                  block_size=16, async_scheduling=True),
}
# A prompt chunk longer than the control buffer (protocol.CONTROL_CAPACITY): its ids take a second broadcast.
LONG = dict(max_model_len=2048, max_num_seqs=2, max_num_batched_tokens=2048, num_kv_blocks=140, block_size=16)
_REFERENCE: dict[str, tuple[dict[str, list[list[int]]], Any]] = {}


def reference(name: str, checkpoint: Path) -> tuple[dict[str, list[list[int]]], Any]:
    """Tokens and stats of the single-process engine (computed once per scenario)."""
    if name not in _REFERENCE:
        engine = LLMEngine(load_model(str(checkpoint)), EngineConfig(**SCENARIOS[name]), Tokenizer.from_version("v3"))
        outs = run_requests(engine, mixed_requests())
        _REFERENCE[name] = (token_ids(outs), engine.get_stats())
    return _REFERENCE[name]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_tokens_equal_single_process(executor: DistributedExecutor, tiny_hf_checkpoint: Path,
                                     scenario: str) -> None:
    want, want_stats = reference(scenario, tiny_hf_checkpoint)
    engine = engine_over(executor, LLMEngine, **SCENARIOS[scenario])
    outs = run_requests(engine, mixed_requests())
    got = token_ids(outs)
    assert got.keys() == want.keys()
    for rid in want:
        assert got[rid] == want[rid], f"request {rid}"
    stats = engine.get_stats()
    assert stats.num_generation_tokens == want_stats.num_generation_tokens
    if scenario == "preempt":
        assert stats.num_preemptions > 0 and stats.num_preemptions == want_stats.num_preemptions
    else:
        assert stats.prefix_cache_hit_rate > 0
    assert stats.num_free_blocks == stats.num_total_blocks  # every block back
    # Routing counts are rank 0's, and rank 0 sees every token: the same as one process.
    assert engine.expert_counts().sum() > 0


def test_long_prompt_chunk(executor: DistributedExecutor, tiny_hf_checkpoint: Path) -> None:
    prompt = torch.randint(10, 32768, (2040,), generator=torch.Generator().manual_seed(4)).tolist()
    requests = [(prompt, SamplingParams(temperature=0.0, max_tokens=4))]
    single = LLMEngine(load_model(str(tiny_hf_checkpoint)), EngineConfig(**LONG), Tokenizer.from_version("v3"))
    tp = engine_over(executor, LLMEngine, **LONG)
    assert token_ids(run_requests(tp, requests)) == token_ids(run_requests(single, requests))

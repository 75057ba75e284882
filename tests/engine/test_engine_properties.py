"""Property test: whatever the block size, KV budget, token budget, batch limit and prefix sharing, every
request gets exactly its greedy reference tokens and every block is free at the end."""

from __future__ import annotations

import functools

import hypothesis.strategies as st
from engine_testing import assert_no_leaks, build_tiny_model, greedy_reference, run_to_completion
from hypothesis import HealthCheck, given, settings

from mixtral.engine.config import EngineConfig
from mixtral.engine.llm_engine import LLMEngine
from mixtral.sampling import SamplingParams

MODEL = functools.lru_cache(maxsize=1)(build_tiny_model)


@functools.lru_cache(maxsize=512)
def _reference(prompt: tuple[int, ...], max_tokens: int) -> list[int]:
    return greedy_reference(MODEL(), list(prompt), max_tokens)


shared_prefix = list(range(1000, 1019))  # 19 tokens: several full blocks at any block size here
request = st.tuples(
    st.booleans(),  # starts with the shared prefix
    st.lists(st.integers(10, 32767), min_size=1, max_size=25),
    st.integers(1, 12),  # max_tokens
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    requests=st.lists(request, min_size=1, max_size=10),
    block_size=st.sampled_from([1, 2, 4, 8, 16]),
    kv_slack=st.integers(0, 40),
    budget=st.integers(1, 64),
    max_num_seqs=st.integers(1, 8),
    prefix_caching=st.booleans(),
)
def test_any_configuration_matches_the_reference(requests, block_size, kv_slack, budget, max_num_seqs,
                                                 prefix_caching) -> None:
    prompts = [(shared_prefix if shared else []) + tail for shared, tail, _ in requests]
    longest = max(len(p) + n for p, (_, _, n) in zip(prompts, requests, strict=True))
    # Just enough blocks for the longest request alone, plus some slack: preemption is common.
    num_blocks = -(-longest // block_size) + kv_slack
    engine = LLMEngine(MODEL(), EngineConfig(block_size=block_size, num_kv_blocks=num_blocks, max_model_len=128,
                                             max_num_batched_tokens=budget, max_num_seqs=max_num_seqs,
                                             enable_prefix_caching=prefix_caching))
    for i, (prompt, (_, _, n)) in enumerate(zip(prompts, requests, strict=True)):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    done = run_to_completion(engine, lambda e: e.block_manager.check_invariants())
    for i, (prompt, (_, _, n)) in enumerate(zip(prompts, requests, strict=True)):
        assert done[str(i)].outputs[0].token_ids == _reference(tuple(prompt), n), f"request {i}"
    assert_no_leaks(engine)

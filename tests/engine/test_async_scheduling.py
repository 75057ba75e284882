"""Async scheduling: a decode step launched before the previous step's tokens reach the host.

Every engine test already runs with and without it (conftest's ``make_engine``); these tests check that the
launch-ahead path is actually taken, and the cases where it has to compute a token that is then dropped
(a stop token, an abort) or hand the choice back to the scheduler (a new arrival, a full KV cache).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from engine_testing import assert_no_leaks, random_prompts, run_to_completion

from mixtral.engine.llm_engine import LLMEngine
from mixtral.sampling import SamplingParams


def _count_ahead(engine: LLMEngine) -> dict[str, int]:
    """Count launches fed on the device's sampled ids (launched ahead) and all launches."""
    counts = {"ahead": 0, "all": 0}
    original = engine.model_runner.launch

    def spy(plan: Any, *args: Any, **kwargs: Any) -> Any:
        counts["all"] += 1
        counts["ahead"] += kwargs.get("input_ids") is not None
        return original(plan, *args, **kwargs)

    engine.model_runner.launch = spy  # type: ignore[method-assign]
    return counts


def _run(make_engine: Callable[..., LLMEngine], async_scheduling: bool,
         requests: list[tuple[list[int], SamplingParams]],
         **kwargs: Any) -> tuple[dict[str, list[int]], dict[str, str | None], dict[str, int]]:
    engine = make_engine(async_scheduling=async_scheduling, **kwargs)
    counts = _count_ahead(engine)
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(f"r{i}", prompt, params)
    done = run_to_completion(engine, lambda e: e.block_manager.check_invariants())
    tokens = {rid: out.outputs[0].token_ids for rid, out in done.items()}
    reasons = {rid: out.outputs[0].finish_reason for rid, out in done.items()}
    return tokens, reasons, counts


def _mixed_requests() -> list[tuple[list[int], SamplingParams]]:
    prompts = random_prompts(6, 3, 40, seed=21)
    params = [
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
        SamplingParams(temperature=0.9, seed=5, max_tokens=25, ignore_eos=True),
        SamplingParams(temperature=0.7, top_p=0.9, seed=6, max_tokens=18, logprobs=2, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=12, min_tokens=4),
        SamplingParams(temperature=1.0, top_k=20, seed=7, max_tokens=33, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True),
    ]
    return list(zip(prompts, params, strict=True))


def test_launch_ahead_is_taken_and_changes_nothing(make_engine: Callable[..., LLMEngine]) -> None:
    reqs = _mixed_requests()
    want, want_reasons, sync_counts = _run(make_engine, False, reqs)
    got, got_reasons, counts = _run(make_engine, True, reqs)
    assert got == want and got_reasons == want_reasons
    assert sync_counts["ahead"] == 0
    # Decode steps after the first are launched ahead (the rest: prefills, and steps after a finish).
    assert counts["ahead"] >= 0.6 * counts["all"], counts


def test_a_stop_token_drops_the_token_computed_ahead(make_engine: Callable[..., LLMEngine]) -> None:
    """A sequence stopping on a token it samples at step N has already computed step N + 1: that token
    must not appear, and the sequence's blocks must all come back."""
    prompts = random_prompts(3, 5, 20, seed=4)
    free_run, _, _ = _run(make_engine, False, [(p, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
                                               for p in prompts])
    # Stop each request on the token it would produce 6th, 11th and 17th.
    stops = [free_run["r0"][5], free_run["r1"][10], free_run["r2"][16]]
    reqs = [(p, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop_token_ids=[t]))
            for p, t in zip(prompts, stops, strict=True)]
    want, want_reasons, _ = _run(make_engine, False, reqs)
    got, got_reasons, counts = _run(make_engine, True, reqs)
    assert got == want and got_reasons == want_reasons
    for i, stop in enumerate(stops):
        assert got[f"r{i}"][-1] == stop and len(got[f"r{i}"]) == free_run[f"r{i}"].index(stop) + 1
    assert counts["ahead"] > 0


def test_abort_while_a_step_is_in_flight(make_engine: Callable[..., LLMEngine]) -> None:
    engine = make_engine(async_scheduling=True)
    counts = _count_ahead(engine)
    prompts = random_prompts(2, 5, 10, seed=9)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    engine.add_request("a", prompts[0], params)
    engine.add_request("b", prompts[1], params)
    for _ in range(5):
        engine.step()
    assert engine._inflight is not None and counts["ahead"] > 0  # a step is on its way
    out = engine.abort_request("a")
    assert out[0].finished and out[0].outputs[0].finish_reason == "abort"
    done = run_to_completion(engine)
    assert done["b"].outputs[0].finish_reason == "length" and len(done["b"].outputs[0].token_ids) == 20
    # Aborting everything while a step is in flight leaves a stale step: the next request is unaffected.
    engine.add_request("c", prompts[0], params)
    for _ in range(4):
        engine.step()
    engine.abort_request("c")
    assert not engine.has_unfinished_requests()
    engine.add_request("d", prompts[0], params)
    done = run_to_completion(engine)
    reference = make_engine(async_scheduling=False)
    reference.add_request("d", prompts[0], params)
    assert done["d"].outputs[0].token_ids == run_to_completion(reference)["d"].outputs[0].token_ids
    assert_no_leaks(engine)


def test_a_new_arrival_is_admitted_at_the_next_step(make_engine: Callable[..., LLMEngine]) -> None:
    engine = make_engine(async_scheduling=True)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    prompts = random_prompts(2, 8, 12, seed=13)
    engine.add_request("first", prompts[0], params)
    for _ in range(6):
        engine.step()
    engine.add_request("late", prompts[1], params)
    # The step in flight is applied; the one launched with it (ahead of it, or the scheduler's) admits the arrival.
    engine.step()
    engine.step()
    late = engine._groups["late"]
    assert late.seqs[0].num_computed_tokens >= len(prompts[1])
    done = run_to_completion(engine)
    for rid, prompt in (("first", prompts[0]), ("late", prompts[1])):
        reference = make_engine(async_scheduling=False)
        reference.add_request(rid, prompt, params)
        assert done[rid].outputs[0].token_ids == run_to_completion(reference)[rid].outputs[0].token_ids


@pytest.mark.parametrize("async_first", [False, True])
def test_prefix_cache_after_async_decode(make_engine: Callable[..., LLMEngine], async_first: bool) -> None:
    """Blocks filled by tokens computed ahead are published with the right hashes: a prompt that repeats a
    finished request's prompt and output hits the cache and continues exactly as without it."""
    engine = make_engine(async_scheduling=async_first, block_size=4, enable_prefix_caching=True)
    prompt = random_prompts(1, 10, 10, seed=17)[0]
    params = SamplingParams(temperature=0.0, max_tokens=26, ignore_eos=True)
    engine.add_request("base", prompt, params)
    first = run_to_completion(engine)["base"].outputs[0].token_ids
    follow = prompt + first[:20]  # 30 tokens: 7 full blocks of 4 can come from the cache
    engine.add_request("follow", follow, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    out = run_to_completion(engine)["follow"]
    assert out.num_cached_tokens == 28
    assert out.outputs[0].token_ids == first[20:26]


def test_a_full_batch_with_a_queue_keeps_overlapping(make_engine: Callable[..., LLMEngine]) -> None:
    """Requests waiting behind a full batch cannot be admitted anyway: steps are still launched ahead, and the
    queued request is admitted as soon as a seat frees."""
    prompts = random_prompts(3, 5, 12, seed=23)
    reqs = [(p, SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True)) for p, m in zip(prompts, (12, 20, 8),
                                                                                               strict=True)]
    want, _, _ = _run(make_engine, False, reqs, max_num_seqs=2)
    engine = make_engine(async_scheduling=True, max_num_seqs=2)
    counts = _count_ahead(engine)
    for i, (prompt, params) in enumerate(reqs):
        engine.add_request(f"r{i}", prompt, params)
    ahead_while_queued = 0
    done = {}
    while engine.has_unfinished_requests():
        queued = bool(engine.scheduler.waiting)
        before = counts["ahead"]
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        ahead_while_queued += queued and counts["ahead"] > before
    assert done == want
    assert ahead_while_queued >= 5  # r2 waited ~11 steps behind r0 and r1

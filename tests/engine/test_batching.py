"""Continuous batching gives every request exactly the tokens it gets alone: plain, under preemption, with
chunked prefill, and with prompts served from the prefix cache."""

from __future__ import annotations

import functools

import pytest
from engine_testing import greedy_reference, random_prompts, run_to_completion

from mixtral.engine.llm_engine import LLMEngine
from mixtral.model.mixtral import Transformer, init_random_weights
from mixtral.model.presets import preset
from mixtral.sampling import SamplingParams

NUM_REQUESTS = 24


@pytest.fixture(scope="module")
def workload(tiny_model) -> list[tuple[list[int], int, list[int]]]:
    """24 (prompt, max_tokens, greedy reference tokens) of mixed prompt and output lengths."""
    prompts = random_prompts(NUM_REQUESTS, 3, 40, seed=1)
    lengths = [4 + (7 * i) % 21 for i in range(NUM_REQUESTS)]  # 4..24 new tokens
    return [(p, n, greedy_reference(tiny_model, p, n)) for p, n in zip(prompts, lengths, strict=True)]


def _submit_all(engine: LLMEngine, workload) -> None:
    for i, (prompt, max_tokens, _) in enumerate(workload):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens))


def _assert_matches(done, workload) -> None:
    assert len(done) == len(workload)
    for i, (_, max_tokens, want) in enumerate(workload):
        out = done[f"r{i}"].outputs[0]
        assert out.token_ids == want, f"request r{i} diverged from its single-request reference"
        assert out.finish_reason == "length" and len(out.token_ids) == max_tokens


def test_mixed_batch_matches_each_request_alone(make_engine, workload) -> None:
    engine = make_engine()
    _submit_all(engine, workload)
    batch_sizes = []
    done = run_to_completion(engine, lambda e: batch_sizes.append(len(e.scheduler.running)))
    _assert_matches(done, workload)
    assert max(batch_sizes) >= 16, "requests were not batched together"
    assert engine.get_stats().num_preemptions == 0


def test_forced_preemption_gives_identical_tokens(make_engine, workload) -> None:
    # 24 blocks of 4 tokens: the largest request needs 16 blocks, all 24 together need far more.
    engine = make_engine(num_kv_blocks=24, block_size=4)
    _submit_all(engine, workload)
    done = run_to_completion(engine, lambda e: e.block_manager.check_invariants())
    _assert_matches(done, workload)
    assert engine.get_stats().num_preemptions > 0, "the tiny KV budget should have forced preemption"


def test_chunked_prefill_of_long_prompts(make_engine, tiny_model) -> None:
    prompts = random_prompts(4, 70, 120, seed=2)
    wants = [greedy_reference(tiny_model, p, 6) for p in prompts]
    engine = make_engine(max_num_batched_tokens=32, block_size=8)
    chunks: list[int] = []
    original = engine.runner.launch

    def spy(plan, *args, **kwargs):
        chunks.extend(s.num_new_tokens for s in plan.scheduled if s.seq.is_prefill)
        assert sum(s.num_new_tokens for s in plan.scheduled) <= 32  # the per-step token budget
        return original(plan, *args, **kwargs)

    engine.runner.launch = spy
    for i, p in enumerate(prompts):
        engine.add_request(f"p{i}", p, SamplingParams(temperature=0.0, max_tokens=6))
    done = run_to_completion(engine)
    for i, want in enumerate(wants):
        assert done[f"p{i}"].outputs[0].token_ids == want
    assert max(chunks) <= 32 and len(chunks) >= sum(-(-len(p) // 32) for p in prompts)


@pytest.mark.parametrize("block_size", [4, 16])
def test_repeated_prefix_is_served_from_cache(make_engine, tiny_model, block_size: int) -> None:
    prefix = random_prompts(1, 45, 45, seed=3)[0]
    first, second = [*prefix, 11, 12, 13], [*prefix, 21, 22]
    ref = functools.partial(greedy_reference, tiny_model)
    engine = make_engine(block_size=block_size)
    engine.add_request("a", first, SamplingParams(temperature=0.0, max_tokens=8))
    out_a = run_to_completion(engine)["a"]
    assert out_a.num_cached_tokens == 0
    engine.add_request("b", second, SamplingParams(temperature=0.0, max_tokens=8))
    out_b = run_to_completion(engine)["b"]
    # Every full block of the shared 45-token prefix comes from the cache.
    assert out_b.num_cached_tokens == (45 // block_size) * block_size
    assert out_b.outputs[0].token_ids == ref(second, 8)
    assert out_a.outputs[0].token_ids == ref(first, 8)
    # The identical prompt again: all but its last (partial or final) block is cached; same tokens.
    engine.add_request("a2", first, SamplingParams(temperature=0.0, max_tokens=8))
    out_a2 = run_to_completion(engine)["a2"]
    assert out_a2.num_cached_tokens == ((len(first) - 1) // block_size) * block_size
    assert out_a2.outputs[0].token_ids == out_a.outputs[0].token_ids
    looked_up = 2 * len(first) + len(second)
    assert engine.get_stats().prefix_cache_hit_rate == pytest.approx(
        (out_b.num_cached_tokens + out_a2.num_cached_tokens) / looked_up
    )


def test_prefix_caching_can_be_disabled(make_engine, tiny_model) -> None:
    prompt = random_prompts(1, 40, 40, seed=4)[0]
    engine = make_engine(enable_prefix_caching=False)
    outs = []
    for rid in ("x", "y"):
        engine.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=5))
        outs.append(run_to_completion(engine)[rid])
    assert [o.num_cached_tokens for o in outs] == [0, 0]
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids == greedy_reference(tiny_model, prompt, 5)


def test_abort_frees_blocks_and_others_finish(make_engine, workload) -> None:
    engine = make_engine()
    _submit_all(engine, workload[:6])
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    (aborted,) = engine.abort_request("r1")
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    engine.abort_request(["r3", "does-not-exist"])
    done = run_to_completion(engine)
    assert sorted(done) == ["r0", "r2", "r4", "r5"]
    for i in (0, 2, 4, 5):
        assert done[f"r{i}"].outputs[0].token_ids == workload[i][2]


def test_waiting_request_is_aborted_before_it_runs(make_engine) -> None:
    engine = make_engine(max_num_seqs=1)
    engine.add_request("first", [20, 21, 22], SamplingParams(temperature=0.0, max_tokens=3))
    engine.add_request("second", [30, 31], SamplingParams(temperature=0.0, max_tokens=3))
    engine.step()
    assert len(engine.scheduler.running) == 1 and len(engine.scheduler.waiting) == 1
    engine.abort_request("second")
    assert list(run_to_completion(engine)) == ["first"]


def test_sliding_window_model_matches_its_reference(make_engine) -> None:
    model = Transformer(preset("tiny").replace(sliding_window=12))
    init_random_weights(model, seed=5, std=0.2)
    model.eval()
    prompts = random_prompts(5, 20, 45, seed=9)
    engine = make_engine(model=model, block_size=4, max_num_batched_tokens=16)
    for i, p in enumerate(prompts):
        engine.add_request(f"w{i}", p, SamplingParams(temperature=0.0, max_tokens=10))
    done = run_to_completion(engine)
    for i, p in enumerate(prompts):
        assert done[f"w{i}"].outputs[0].token_ids == greedy_reference(model, p, 10)

"""Scheduler policy: first-come first-served admission, the oldest requests progress under memory pressure,
the per-step token budget and the max_num_seqs batch limit hold."""

from __future__ import annotations

from engine_testing import random_prompts, run_to_completion

from mixtral.sampling import SamplingParams


def test_fcfs_under_preemption_finishes_in_arrival_order(make_engine) -> None:
    engine = make_engine(num_kv_blocks=12, block_size=4, max_num_batched_tokens=64)
    prompts = random_prompts(8, 10, 10, seed=7)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=12))
    order: list[str] = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == [f"r{i}" for i in range(8)]
    assert engine.get_stats().num_preemptions > 0


def test_a_large_request_at_the_head_is_not_overtaken(make_engine) -> None:
    engine = make_engine(num_kv_blocks=10, block_size=4, max_num_batched_tokens=256)
    # small0 holds 3 blocks at once (12 tokens), so big (8 blocks) cannot join it; small1 (1 block) could.
    engine.add_request("small0", list(range(100, 112)), SamplingParams(temperature=0.0, max_tokens=20))
    engine.add_request("big", list(range(10, 40)), SamplingParams(temperature=0.0, max_tokens=2))
    engine.add_request("small1", [4, 5, 6], SamplingParams(temperature=0.0, max_tokens=2))
    first_step_of: dict[str, int] = {}
    step = 0
    while engine.has_unfinished_requests():
        engine.step()
        step += 1
        for seq in engine.scheduler.running:
            first_step_of.setdefault(seq.request_id, step)
    assert first_step_of["big"] > 1, "big should have had to wait for small0's blocks"
    assert first_step_of["big"] <= first_step_of["small1"], "a later request overtook the waiting head"


def test_token_budget_and_batch_limit(make_engine) -> None:
    engine = make_engine(max_num_seqs=3, max_num_batched_tokens=20)
    for i, p in enumerate(random_prompts(7, 5, 30, seed=8)):
        engine.add_request(f"q{i}", p, SamplingParams(temperature=0.0, max_tokens=4))
    original = engine.model_runner.launch
    seen: list[tuple[int, int]] = []

    def spy(plan, *args, **kwargs):
        seen.append((len(plan.scheduled), sum(s.num_new_tokens for s in plan.scheduled)))
        return original(plan, *args, **kwargs)

    engine.model_runner.launch = spy
    done = run_to_completion(engine)
    assert len(done) == 7
    assert max(n for n, _ in seen) == 3 and max(t for _, t in seen) == 20


def test_samples_of_n_count_against_the_batch_limit(make_engine) -> None:
    engine = make_engine(max_num_seqs=4, max_num_batched_tokens=8)  # prompts take several chunked steps
    for i in range(3):
        engine.add_request(f"n{i}", list(range(30 + i, 50 + i)), SamplingParams(n=3, temperature=1.0, max_tokens=3))
    peak = 0

    def check(e) -> None:
        nonlocal peak
        seats = sum(1 + s.fork_count for s in e.scheduler.running)
        peak = max(peak, seats)
        assert seats <= 4

    done = run_to_completion(engine, check)
    assert peak == 3 and all(len(done[f"n{i}"].outputs) == 3 for i in range(3))

"""Edge cases found in review: odd-but-valid requests that must not crash the engine or leave work behind."""

from __future__ import annotations

import asyncio

import pytest
from engine_testing import run_to_completion

from mixtral.engine.async_engine import AsyncEngine
from mixtral.sampling import SamplingParams


def test_stop_token_id_outside_the_vocabulary_is_refused_at_admission(make_engine) -> None:
    # min_tokens bans the stop ids by indexing the logits: an id past the vocabulary used to crash the whole
    # step (every request in the batch with it) with an IndexError.
    engine = make_engine()
    vocab = engine.model_args.vocab_size
    engine.add_request("other", [1, 20, 30], SamplingParams(temperature=0.0, max_tokens=3))
    with pytest.raises(ValueError, match=rf"stop_token_ids \[{vocab}\] are outside the vocabulary"):
        engine.add_request("bad", [1, 20, 30], SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=[vocab]))
    done = run_to_completion(engine)
    assert set(done) == {"other"} and len(done["other"].outputs[0].token_ids) == 3


def test_consumer_cancelled_before_admission_does_not_leave_its_request_running(make_engine) -> None:
    engine = make_engine()

    async def main() -> None:
        async_engine = AsyncEngine(engine)
        await async_engine.start()

        async def consume() -> None:
            async for _ in async_engine.generate([1, 20, 30], SamplingParams(max_tokens=None, ignore_eos=True),
                                                 "gone"):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0)  # the task has queued its request and awaits admission
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The id is free again once the abort ran; a later request under it is not aborted by the first's cleanup.
        for _ in range(500):
            if not engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        outs = [o async for o in async_engine.generate([1, 20, 30], SamplingParams(max_tokens=3), "gone")]
        assert outs[-1].outputs[0].finish_reason == "length" and len(outs[-1].outputs[0].token_ids) == 3
        await async_engine.shutdown()

    asyncio.run(main())
    stats = engine.get_stats()
    # Without the abort it would generate up to max_model_len (509 tokens) for nobody.
    assert stats.num_generation_tokens < 100 and stats.num_finished_requests == 2


def test_unsigned_64_bit_seeds_sample_like_their_signed_bits(make_engine) -> None:
    # A seed from random.getrandbits(64) used to overflow the sampler's int64 tensor inside step().
    def sample(seed: int) -> list[int]:
        engine = make_engine()
        engine.add_request("s", [1, 20, 30], SamplingParams(temperature=1.0, seed=seed, max_tokens=6, n=2))
        return [c.token_ids for c in run_to_completion(engine)["s"].outputs]

    big = sample(2**64 - 3)
    assert big[0] == sample(-3)[0]  # the same 64 bits
    assert big[0] != sample(3)[0]
    assert sample(2**63)[0] == sample(-(2**63))[0]
    for bad in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match=r"SamplingParams.seed .*64-bit"):
            SamplingParams(seed=bad)


def test_top_k_beyond_the_vocabulary_keeps_every_token(make_engine) -> None:
    # top_k = 2**70 is valid (>= -1) but used to overflow the sampler's int64 settings inside step().
    def sample(top_k: int) -> list[int]:
        engine = make_engine()
        engine.add_request("k", [1, 20, 30], SamplingParams(temperature=1.0, seed=11, top_k=top_k, max_tokens=6))
        return run_to_completion(engine)["k"].outputs[0].token_ids

    assert sample(2**70) == sample(-1) == sample(10**6)

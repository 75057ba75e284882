"""AsyncEngine: concurrent streams give the same tokens as the synchronous engine; cancellation aborts and
frees blocks; admission errors and overload surface to the caller; shutdown drains or aborts."""

from __future__ import annotations

import asyncio

import pytest
from engine_testing import greedy_reference

from mixtral.engine.async_engine import AsyncEngine, EngineDeadError, EngineOverloadedError
from mixtral.engine.llm_engine import RequestTooLongError
from mixtral.sampling import SamplingParams


async def _collect(engine: AsyncEngine, prompt, params, rid: str) -> list:
    return [out async for out in engine.generate(prompt, params, rid)]


def test_concurrent_streams_match_greedy_reference(make_engine, tiny_model) -> None:
    prompts = [[1, 10 + i, 20 + i, 30] for i in range(6)]

    async def main() -> list[list]:
        engine = AsyncEngine(make_engine())
        await engine.start()
        try:
            return await asyncio.gather(*[
                _collect(engine, p, SamplingParams(temperature=0.0, max_tokens=5 + i), f"r{i}")
                for i, p in enumerate(prompts)
            ])
        finally:
            await engine.shutdown()

    streams = asyncio.run(main())
    for i, (prompt, stream) in enumerate(zip(prompts, streams, strict=True)):
        assert stream[-1].finished and not any(o.finished for o in stream[:-1])
        lengths = [len(o.outputs[0].token_ids) for o in stream]
        assert lengths == sorted(lengths) and lengths[-1] == 5 + i  # cumulative, growing
        assert stream[-1].outputs[0].token_ids == greedy_reference(tiny_model, prompt, 5 + i)


def test_cancelled_consumer_aborts_and_frees_blocks(make_engine) -> None:
    llm_engine = make_engine()

    async def main() -> None:
        engine = AsyncEngine(llm_engine)
        await engine.start()
        try:
            async def consume() -> None:
                async for _ in engine.generate([1, 2, 3], SamplingParams(max_tokens=400), "long"):
                    await asyncio.sleep(0)

            task = asyncio.create_task(consume())
            while engine.stats.num_running == 0:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(200):
                if not llm_engine.has_unfinished_requests():
                    break
                await asyncio.sleep(0.01)
            assert not llm_engine.has_unfinished_requests()
            assert engine.stats.num_free_blocks == engine.stats.num_total_blocks
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_admission_errors_overload_and_shutdown(make_engine) -> None:
    async def main() -> None:
        engine = AsyncEngine(make_engine(max_model_len=64, max_num_seqs=1), max_queued_requests=1)
        with pytest.raises(EngineDeadError, match="start"):
            await _collect(engine, [1], None, "early")
        await engine.start()
        with pytest.raises(RequestTooLongError, match="max_model_len=64"):
            await _collect(engine, list(range(10, 70)), SamplingParams(max_tokens=8), "too-long")
        # One running request (max_num_seqs=1) and one queued behind it fill the queue.
        hog = engine.generate([1, 2, 3], SamplingParams(max_tokens=50), "hog")
        first = await hog.__anext__()
        assert not first.finished
        queued = asyncio.create_task(_collect(engine, [4, 5], SamplingParams(max_tokens=2), "queued"))
        while engine.stats.num_waiting == 0:
            await asyncio.sleep(0.001)
        with pytest.raises(EngineOverloadedError, match="max_queued_requests=1"):
            await _collect(engine, [1, 2], SamplingParams(max_tokens=2), "over")
        # Shutdown without drain aborts everything; streams end with finish_reason "abort".
        await engine.shutdown(drain_timeout=None)
        rest = [o async for o in hog]
        assert rest and rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
        assert (await queued)[-1].outputs[0].finish_reason == "abort"
        with pytest.raises(EngineDeadError):
            await _collect(engine, [1], None, "late")

    asyncio.run(main())


def test_shutdown_with_drain_lets_requests_finish(make_engine) -> None:
    async def main() -> list:
        engine = AsyncEngine(make_engine())
        await engine.start()
        task = asyncio.create_task(_collect(engine, [1, 2, 3], SamplingParams(max_tokens=6), "d"))
        await asyncio.sleep(0.01)
        await engine.shutdown(drain_timeout=30)
        return await task

    stream = asyncio.run(main())
    assert stream[-1].outputs[0].finish_reason == "length" and len(stream[-1].outputs[0].token_ids) == 6


def test_a_crashing_step_ends_streams_and_marks_the_engine_dead(make_engine) -> None:
    llm_engine = make_engine()
    real_step = llm_engine.step
    calls = {"n": 0}

    def failing_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return real_step(*args, **kwargs)

    llm_engine.step = failing_step

    async def main() -> None:
        engine = AsyncEngine(llm_engine)
        await engine.start()
        seen = []
        with pytest.raises(EngineDeadError) as info:
            async for out in engine.generate([1, 2, 3], SamplingParams(max_tokens=50), "c"):
                seen.append(out)
        # Two steps ran before the failure. The stream keeps only the newest cumulative output, so a consumer that
        # falls behind (a loaded machine) may see the two steps' outputs as one.
        assert isinstance(info.value.__cause__, RuntimeError) and 1 <= len(seen) <= 2
        assert len(seen[-1].outputs[0].token_ids) == 2
        assert not engine.is_running and isinstance(engine.error, RuntimeError)
        with pytest.raises(EngineDeadError, match="injected failure"):
            await _collect(engine, [1], None, "after")
        await engine.shutdown()

    asyncio.run(main())
    llm_engine.abort_request("c")  # the crashed engine still holds the request; free it for the leak check

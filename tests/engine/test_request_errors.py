"""An error raised for one request anywhere in the step fails that request alone.

Each case puts a request that fails (its guide while filling the mask, its guide while accepting a token, its
detokenizer, one of its n > 1 samples) in a batch with ordinary requests: the failing one ends with
finish_reason "error" and a ``RequestError``, its blocks are freed (``make_engine`` checks for leaks), and every
other request produces exactly the tokens it produces alone (the greedy reference).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import torch
from engine_testing import greedy_reference, run_to_completion

from mixtral.engine.async_engine import AsyncEngine
from mixtral.engine.llm_engine import LLMEngine
from mixtral.guide import bitmask_words
from mixtral.model.mixtral import Transformer
from mixtral.sampling import SamplingParams

PROMPTS = {"a": [1, 20, 30, 40], "b": [1, 500, 501], "c": [1, 7000, 7001, 7002, 7003]}


class FailingGuide:
    """Allows every token; raises ``error`` from ``fill_bitmask`` or ``accept_token`` at its ``at``-th call."""

    def __init__(self, vocab: int, where: str, at: int, error: Exception) -> None:
        self.vocab, self.where, self.at, self.error = vocab, where, at, error
        self.calls = {"fill": 0, "accept": 0}

    def _tick(self, what: str) -> None:
        self.calls[what] += 1
        if what == self.where and self.calls[what] == self.at:
            raise self.error

    def fill_bitmask(self, bitmask_row: torch.Tensor) -> None:
        assert bitmask_row.shape == (bitmask_words(self.vocab),)
        bitmask_row.fill_(-1)
        self._tick("fill")

    def accept_token(self, token_id: int) -> None:
        self._tick("accept")

    def is_finished(self) -> bool:
        return False

    def copy(self) -> FailingGuide:
        return FailingGuide(self.vocab, self.where, self.at, self.error)


def _run_with(engine: LLMEngine, bad: SamplingParams, tiny_model: Transformer, tokens: int = 8) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    engine.add_request("a", PROMPTS["a"], params)
    engine.add_request("bad", PROMPTS["b"], bad)
    engine.add_request("c", PROMPTS["c"], params)
    done = run_to_completion(engine)
    for rid in ("a", "c"):
        out = done[rid]
        assert out.error is None and out.outputs[0].finish_reason == "length"
        assert out.outputs[0].token_ids == greedy_reference(tiny_model, PROMPTS[rid], tokens), rid
    return done


@pytest.mark.parametrize("where, at, error, invalid", [
    ("fill", 1, ValueError("grammar too complex"), True),  # the first mask: before any token
    ("fill", 4, ValueError("grammar too complex"), True),  # mid-generation
    ("accept", 3, RuntimeError("matcher state corrupted"), False),  # not the request's input: an internal error
])
def test_a_failing_guide_fails_its_request_only(make_engine: Callable[..., LLMEngine], tiny_model: Transformer,
                                                where: str, at: int, error: Exception, invalid: bool) -> None:
    vocab = tiny_model.args.vocab_size
    bad = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, guide=FailingGuide(vocab, where, at, error))
    done = _run_with(make_engine(), bad, tiny_model)
    out = done["bad"]
    assert out.finished and out.outputs[0].finish_reason == "error"
    assert out.error is not None and out.error.invalid_request is invalid
    assert str(error) in out.error.message
    # Tokens applied before the failure stay (a stream has sent them); none after it.
    assert len(out.outputs[0].token_ids) == (at - 1 if where == "fill" else at)


def test_a_failing_detokenizer_fails_its_request_only(make_engine: Callable[..., LLMEngine],
                                                       tiny_model: Transformer) -> None:
    class BrokenDetokenizer:
        def add(self, token_id: int) -> str:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

        def flush(self) -> str:
            return ""

    engine = make_engine()
    original = engine.output_processor.start

    def start(seq, group) -> None:  # type: ignore[no-untyped-def]
        original(seq, group)
        if seq.request_id == "bad":
            seq.detokenizer = BrokenDetokenizer()

    engine.output_processor.start = start  # type: ignore[method-assign]
    done = _run_with(engine, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), tiny_model)
    assert done["bad"].outputs[0].finish_reason == "error"
    assert done["bad"].error is not None and "invalid start byte" in done["bad"].error.message
    assert done["bad"].error.invalid_request  # UnicodeDecodeError is a ValueError


def test_one_failing_sample_fails_the_whole_request(make_engine: Callable[..., LLMEngine],
                                                     tiny_model: Transformer) -> None:
    vocab = tiny_model.args.vocab_size
    guide = FailingGuide(vocab, "fill", 3, ValueError("sample 2 of 3 failed"))
    bad = SamplingParams(n=3, temperature=0.8, seed=3, max_tokens=8, ignore_eos=True, guide=guide)
    out = _run_with(make_engine(), bad, tiny_model)["bad"]
    assert [o.finish_reason for o in out.outputs] == ["error"] * 3
    assert out.error is not None and "sample 2 of 3 failed" in out.error.message


def test_sampling_params_changed_into_invalid_ones_are_refused_at_admission(
        make_engine: Callable[..., LLMEngine]) -> None:
    engine = make_engine()
    params = SamplingParams(max_tokens=4)
    params.top_p = 0.0  # after construction: the sampler's top-p would divide by nothing for the whole batch
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        engine.add_request("bad", [1, 2, 3], params)
    assert not engine.has_unfinished_requests()


def test_the_async_engine_keeps_serving_after_a_request_failed(make_engine: Callable[..., LLMEngine],
                                                               tiny_model: Transformer) -> None:
    llm = make_engine()
    vocab = tiny_model.args.vocab_size

    async def main() -> None:
        engine = AsyncEngine(llm)
        await engine.start()
        bad = SamplingParams(max_tokens=8, guide=FailingGuide(vocab, "fill", 2, ValueError("boom")))
        outs = [o async for o in engine.generate([1, 2, 3], bad, "bad")]
        assert outs[-1].finished and outs[-1].error is not None and "boom" in outs[-1].error.message
        assert engine.is_running and engine.error is None
        good = [o async for o in engine.generate(PROMPTS["a"], SamplingParams(temperature=0.0, max_tokens=5), "ok")]
        assert good[-1].outputs[0].token_ids == greedy_reference(tiny_model, PROMPTS["a"], 5)
        await engine.shutdown()

    asyncio.run(main())


def test_abort_all_ends_every_stream_and_keeps_the_engine_running(make_engine: Callable[..., LLMEngine]) -> None:
    llm = make_engine()

    async def main() -> None:
        engine = AsyncEngine(llm)
        await engine.start()
        params = SamplingParams(max_tokens=400, ignore_eos=True)

        async def last(rid: str) -> str | None:
            outs = [o async for o in engine.generate([1, 2, 3], params, rid)]
            return outs[-1].outputs[0].finish_reason

        tasks = [asyncio.create_task(last(f"r{i}")) for i in range(3)]
        while llm.get_stats().num_running < 3:
            await asyncio.sleep(0.005)
        assert await engine.abort_all() == 3
        assert await asyncio.gather(*tasks) == ["abort"] * 3
        assert engine.is_running and not llm.has_unfinished_requests()
        await engine.shutdown()

    asyncio.run(main())

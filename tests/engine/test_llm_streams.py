"""``LLM.stream``: several open streams (and ``generate`` calls between their items) share one engine, and each
stream still sees every step of its own request, ending with the finished output."""

from __future__ import annotations

from engine_testing import greedy_reference

from mixtral.llm import LLM
from mixtral.sampling import SamplingParams


def test_interleaved_streams_and_generate_each_see_their_request_finish(tiny_model, tokenizer) -> None:
    llm = LLM(tiny_model, tokenizer=tokenizer, num_kv_blocks=128, max_model_len=256)
    prompts = [[1, 40, 50, 60], [1, 70, 80]]
    a = llm.stream(prompts[0], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    b = llm.stream(prompts[1], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    got: dict[str, list] = {"a": [next(a)], "b": [next(b)]}
    # generate() steps both streamed requests too; b finishes inside it.
    (other,) = llm.generate([1, 90], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(other.outputs[0].token_ids) == 4
    got["b"] += list(b)  # used to end without its finished output (another caller had stepped it)
    got["a"] += list(a)
    for name, prompt, n in (("a", prompts[0], 6), ("b", prompts[1], 3)):
        outs = got[name]
        assert outs[-1].finished and not any(o.finished for o in outs[:-1]), name
        assert outs[-1].outputs[0].token_ids == greedy_reference(tiny_model, prompt, n), name
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        assert lengths == sorted(lengths), name
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests() and not llm._mailbox
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_two_streams_advanced_in_turn_each_yield_every_step(tiny_model, tokenizer) -> None:
    llm = LLM(tiny_model, tokenizer=tokenizer, num_kv_blocks=128, max_model_len=256)
    a = llm.stream([1, 40, 50], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    b = llm.stream([1, 60, 70], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    seen: dict[str, list[int]] = {"a": [], "b": []}
    for _ in range(5):
        seen["a"].append(len(next(a).outputs[0].token_ids))
        seen["b"].append(len(next(b).outputs[0].token_ids))
    assert seen == {"a": [1, 2, 3, 4, 5], "b": [1, 2, 3, 4, 5]}
    assert list(a) == [] and list(b) == []
    assert not llm.llm_engine.has_unfinished_requests()

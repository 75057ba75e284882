"""Generation through ``mixtral.LLM`` on a checkpoint folder: token-for-token against transformers'
``generate``, prompt logprobs against decode logprobs, stop strings, stop tokens, max_tokens, EOS, chat
and streaming.

Uses the session checkpoint ``tiny_hf_checkpoint`` (tests/conftest.py: preset ``tiny``, std 0.1, fp32,
with its v3 tokenizer file), loaded by both sides from the same files.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import transformers

from mixtral import LLM, SamplingParams

PROMPT = "The quick brown fox jumps over the lazy dog because"
NUM_TOKENS = 40


pytestmark = pytest.mark.usefixtures("single_torch_thread")  # tests/conftest.py says why


@pytest.fixture(scope="module")
def llm(tiny_hf_checkpoint: Path) -> LLM:
    return LLM(str(tiny_hf_checkpoint), device="cpu", dtype="fp32", num_kv_blocks=256, max_model_len=256)


def _greedy(max_tokens: int = NUM_TOKENS, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)


def _continuation(llm: LLM, prompt_ids: list[int], output_ids: list[int]) -> str:
    return llm.tokenizer.decode(prompt_ids + output_ids)[len(llm.tokenizer.decode(prompt_ids)):]


def _assert_engine_idle(llm: LLM) -> None:
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_greedy_generation_matches_transformers_generate(llm: LLM, tiny_hf_checkpoint: Path) -> None:
    ref = transformers.MixtralForCausalLM.from_pretrained(tiny_hf_checkpoint, dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None  # run the full length on both sides
    ref.generation_config.pad_token_id = 0
    prompts = [PROMPT, "Mixtral routes every token to two of its eight experts"]
    outs = llm.generate(prompts, _greedy(ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        ids = llm.tokenizer.encode(prompt, bos=True)
        assert out.prompt_token_ids == ids
        with torch.no_grad():
            want = ref.generate(torch.tensor([ids]), max_new_tokens=NUM_TOKENS, do_sample=False)[0, len(ids):]
        got = out.outputs[0].token_ids
        assert len(got) == NUM_TOKENS >= 32
        assert got == want.tolist()
        assert len(set(got)) > 5, "degenerate output: the test would prove little"
        # Text continues the prompt: decode(prompt + output) minus decode(prompt) (keeps a leading space).
        assert out.outputs[0].text == _continuation(llm, ids, got)
    _assert_engine_idle(llm)


def test_prompt_logprobs_equal_logprobs_seen_while_decoding(llm: LLM) -> None:
    (decoded,) = llm.generate(PROMPT, _greedy(12, logprobs=0, ignore_eos=True), use_tqdm=False)
    toks = decoded.outputs[0].token_ids
    seen = [entry[t] for t, entry in zip(toks, decoded.outputs[0].logprobs, strict=True)]
    full = decoded.prompt_token_ids + toks
    (scored,) = llm.generate([full], _greedy(1, prompt_logprobs=0), use_tqdm=False)
    assert scored.prompt_logprobs[0] is None
    n = len(decoded.prompt_token_ids)
    recomputed = [scored.prompt_logprobs[n + i][t] for i, t in enumerate(toks)]
    assert recomputed == pytest.approx(seen, abs=1e-4)
    assert decoded.outputs[0].cumulative_logprob == pytest.approx(sum(seen), abs=1e-4)


def test_stop_string_cuts_the_text_and_streams_never_retract(llm: LLM) -> None:
    (full,) = llm.generate(PROMPT, _greedy(ignore_eos=True), use_tqdm=False)
    text = full.outputs[0].text
    assert len(text) > 30
    stop = text[20:24]
    cut = text.find(stop)
    streamed = list(llm.stream(PROMPT, _greedy(stop=["never-appears-xyz", stop], ignore_eos=True)))
    final = streamed[-1].outputs[0]
    assert final.text == text[:cut]
    assert final.finish_reason == "stop" and final.stop_reason == stop
    assert len(final.token_ids) < NUM_TOKENS
    assert final.token_ids == full.outputs[0].token_ids[: len(final.token_ids)]
    texts = [o.outputs[0].text for o in streamed]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts)), "streamed text was retracted"
    (kept,) = llm.generate(PROMPT, _greedy(stop=stop, include_stop_str_in_output=True, ignore_eos=True),
                           use_tqdm=False)
    assert kept.outputs[0].text == text[: cut + len(stop)]
    _assert_engine_idle(llm)


def test_stop_token_ids_and_max_tokens(llm: LLM) -> None:
    (full,) = llm.generate(PROMPT, _greedy(20, ignore_eos=True), use_tqdm=False)
    toks = full.outputs[0].token_ids
    assert full.outputs[0].finish_reason == "length" and len(toks) == 20
    stop_tok = toks[7]
    (stopped,) = llm.generate(PROMPT, _greedy(20, stop_token_ids=[stop_tok], ignore_eos=True), use_tqdm=False)
    out = stopped.outputs[0]
    first = toks.index(stop_tok)
    assert out.token_ids == toks[: first + 1]  # the stop token is kept in the ids
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    (short,) = llm.generate(PROMPT, _greedy(3, ignore_eos=True), use_tqdm=False)
    assert short.outputs[0].token_ids == toks[:3] and short.outputs[0].finish_reason == "length"


def test_generation_stops_at_eos(tiny_hf_checkpoint: Path) -> None:
    llm = LLM(str(tiny_hf_checkpoint), device="cpu", dtype="fp32", num_kv_blocks=64, max_model_len=256)
    eos = llm.tokenizer.eos_id
    (base,) = llm.generate(PROMPT, _greedy(ignore_eos=True), use_tqdm=False)
    target = base.outputs[0].token_ids[5]
    # Make EOS score 1.5x the logit of the token greedy picks at step 5, so EOS wins there (or earlier).
    with torch.no_grad():
        out_w = llm.llm_engine.model.output.weight
        out_w[eos] = 1.5 * out_w[target]
    (ignored,) = llm.generate(PROMPT, _greedy(ignore_eos=True), use_tqdm=False)
    ids = ignored.outputs[0].token_ids
    assert eos in ids, "the modified model should produce EOS"
    (stopped,) = llm.generate(PROMPT, _greedy(), use_tqdm=False)
    out = stopped.outputs[0]
    assert out.token_ids == ids[: ids.index(eos) + 1]
    assert out.finish_reason == "stop" and out.stop_reason is None
    assert out.text == _continuation(llm, stopped.prompt_token_ids, out.token_ids[:-1])  # EOS adds no text


def test_chat_and_stream_use_the_engine(llm: LLM) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    (out,) = llm.chat(messages, _greedy(8, ignore_eos=True), use_tqdm=False)
    assert out.prompt_token_ids == llm.tokenizer.encode_chat(messages)
    both = llm.chat([messages, [{"role": "user", "content": "Hi"}]], _greedy(4, ignore_eos=True), use_tqdm=False)
    assert both[0].outputs[0].token_ids == out.outputs[0].token_ids[:4]
    streamed = list(llm.stream(out.prompt_token_ids, _greedy(8, ignore_eos=True)))
    assert [len(o.outputs[0].token_ids) for o in streamed] == list(range(1, 9))
    assert streamed[-1].outputs[0].token_ids == out.outputs[0].token_ids
    assert streamed[-1].outputs[0].text == out.outputs[0].text
    # Abandoning a stream aborts its request.
    gen = llm.stream(PROMPT, _greedy(30))
    next(gen)
    gen.close()
    _assert_engine_idle(llm)


def test_generate_accepts_every_prompt_shape(llm: LLM) -> None:
    ids = llm.tokenizer.encode(PROMPT, bos=True)
    single_ids = llm.generate(ids, _greedy(3), use_tqdm=False)
    many = llm.generate([PROMPT, ids], [_greedy(3), _greedy(2)], use_tqdm=False)
    assert len(single_ids) == 1 and [len(o.outputs[0].token_ids) for o in many] == [3, 2]
    assert many[0].outputs[0].token_ids == single_ids[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate([PROMPT], [_greedy(), _greedy()], use_tqdm=False)
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        llm.generate([PROMPT, 3.5], use_tqdm=False)  # type: ignore[list-item]
    _assert_engine_idle(llm)

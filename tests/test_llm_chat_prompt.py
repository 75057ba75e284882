"""``LLM.chat`` outputs carry the rendered chat prompt as ``prompt`` (vLLM's ``LLM.chat`` does), not None.

The reference is mistral-common's own rendering of the same request (its decode keeping control tokens, which
joins SentencePiece pieces), mapped to plain text: ``▁`` is a space and ``<0x0A>`` a newline.
"""

from __future__ import annotations

from typing import Any

import pytest

from mixtral import LLM, SamplingParams

pytestmark = pytest.mark.usefixtures("single_torch_thread")  # tests/conftest.py says why

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("tiny", device="cpu", dtype="fp32", max_model_len=256, kv_cache_bytes=1 << 22)


def _mistral_common_text(llm: LLM, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
                         ) -> str:
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

    mt = llm.tokenizer.mistral_tokenizer
    ids = mt.encode_chat_completion(ChatCompletionRequest.from_openai(messages, tools)).tokens
    text = mt.instruct_tokenizer.tokenizer.decode(ids, special_token_policy=SpecialTokenPolicy.KEEP)
    return text.replace("▁", " ").replace("<0x0A>", "\n")


def test_chat_outputs_carry_the_rendered_prompt(llm: LLM) -> None:
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour.\nOne word."}]
    second = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "Again"}]
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    outs = llm.chat([first, second], params, use_tqdm=False)
    assert [o.prompt for o in outs] == [_mistral_common_text(llm, first), _mistral_common_text(llm, second)]
    assert outs[0].prompt.startswith("<s>[INST]") and "Hello!</s>" in outs[1].prompt
    assert all(o.prompt_token_ids == llm.tokenizer.encode_chat(m) for o, m in zip(outs, [first, second], strict=True))


def test_chat_prompt_shows_the_tools(llm: LLM) -> None:
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    (out,) = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), tools=TOOLS,
                      use_tqdm=False)
    assert out.prompt == _mistral_common_text(llm, messages, TOOLS)
    assert "[AVAILABLE_TOOLS]" in out.prompt and "get_weather" in out.prompt


def test_generate_keeps_the_callers_text(llm: LLM) -> None:
    # The same field in generate: the prompt as the caller wrote it (no <s>, which the engine adds as an id).
    (out,) = llm.generate("Hello there", SamplingParams(max_tokens=2), use_tqdm=False)
    assert out.prompt == "Hello there" and out.prompt_token_ids[0] == llm.tokenizer.bos_id

"""The bundled demo model under the server's grammars: constrained decoding must not derail a model that writes
the native v3 call format (including the call id it saw in its prompts).

Through `build_guide` exactly as /v1/chat/completions uses it, greedy, on CPU in fp32.
"""

from __future__ import annotations

import json

import pytest

from mixtral import LLM, SamplingParams
from mixtral.serve.guided import build_guide, parse_tool_calls
from mixtral.train.synthetic import weather_tool

TOOLS = [weather_tool()]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("demo", device="cpu", dtype="float32")


@pytest.mark.parametrize("tool_choice", ["auto", "any"])
@pytest.mark.parametrize("city", ["Paris", "Tokyo"])
def test_guided_weather_call_names_the_city(llm: LLM, city: str, tool_choice: str) -> None:
    messages = [{"role": "user", "content": f"What's the weather in {city}?"}]
    prompt = llm.tokenizer.encode_chat(messages, tools=TOOLS)
    guide = build_guide(llm.tokenizer, tools=TOOLS, tool_choice=tool_choice)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=64, guide=guide), use_tqdm=False)[0]
    calls = parse_tool_calls(llm.tokenizer, out.outputs[0].token_ids)
    assert calls == [{"name": "get_weather", "arguments": {"location": city}}], out.outputs[0].text
    assert json.loads(out.outputs[0].text)[0]["arguments"] == {"location": city}

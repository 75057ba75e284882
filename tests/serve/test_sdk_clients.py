"""The real SDKs against a live server: current ``mistralai``, ``openai``, and ``mistralai==0.4.2`` (own venv).

The model has random weights, so text is arbitrary; what is checked is what the clients parse: ids, roles,
finish reasons, usage, streamed deltas adding up to the non-streamed text (same seed, temperature 0), and tool
calls (``tool_choice`` any/required forces a call through the grammar) with 9-character ids, ``content: ""`` and
arguments valid against the tool's schema, and a second turn carrying the call and its result back.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any

import jsonschema
import pytest

REPO = Path(__file__).resolve().parents[2]
# The 0.4.2 client conflicts with the current one (same package name): it lives in its own venv, created once.
VENV_042 = REPO / ".venv-mistralai042"
SCHEMA = {"type": "object", "properties": {"unit": {"type": "string", "enum": ["c", "f"]}},
          "required": ["unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": SCHEMA}}]
ID = re.compile(r"^[a-zA-Z0-9]{9}$")


def _check_calls(calls: list[Any]) -> None:
    assert calls, "tool_choice any/required must produce at least one call"
    for call in calls:
        assert ID.match(call["id"]), call
        assert call["name"] == "get_weather"
        jsonschema.validate(json.loads(call["arguments"]), SCHEMA)


def _mistral_client(url: str) -> Any:
    try:  # mistralai >= 2 keeps the client in mistralai.client; 1.x exports it at the top level
        from mistralai.client import Mistral
    except ImportError:
        from mistralai import Mistral
    return Mistral(api_key="unused", server_url=url)


def test_mistralai_current(live_server: Any) -> None:
    client = _mistral_client(live_server.url)
    models = client.models.list()
    # Every name the model answers to is a model of its own (the alias's card points at its root).
    assert [m.id for m in models.data] == ["tiny-mixtral", "open-mixtral-8x22b"]
    card = models.data[0]
    assert card.capabilities.function_calling and card.capabilities.completion_chat
    assert card.max_context_length == 256 and "open-mixtral-8x22b" in card.aliases

    messages = [{"role": "user", "content": "Say hi"}]
    resp = client.chat.complete(model="tiny-mixtral", messages=messages, max_tokens=6, temperature=0, random_seed=1)
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens <= 6 and resp.usage.total_tokens == resp.usage.prompt_tokens + \
        resp.usage.completion_tokens

    text, finishes, usage = "", [], None
    for event in client.chat.stream(model="tiny-mixtral", messages=messages, max_tokens=6, temperature=0,
                                    random_seed=1):
        chunk = event.data
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            if chunk.choices[0].finish_reason:
                finishes.append(chunk.choices[0].finish_reason)
        usage = chunk.usage or usage
    assert text == choice.message.content, "the stream must add up to the non-streamed answer (greedy)"
    assert finishes == [choice.finish_reason]
    assert usage is not None and usage.completion_tokens == resp.usage.completion_tokens

    resp = client.chat.complete(model="tiny-mixtral", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                tools=TOOLS, tool_choice="any", parallel_tool_calls=False, max_tokens=120)
    msg = resp.choices[0].message
    assert resp.choices[0].finish_reason == "tool_calls" and msg.content == ""
    _check_calls([{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in msg.tool_calls])

    # The call and its result go back; the model answers the second turn.
    follow = [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": "", "tool_calls": [
                  {"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                                "arguments": c.function.arguments}}
                  for c in msg.tool_calls]},
              *({"role": "tool", "name": c.function.name, "tool_call_id": c.id, "content": '{"temp": 21}'}
                for c in msg.tool_calls)]
    resp = client.chat.complete(model="tiny-mixtral", messages=follow, tools=TOOLS, tool_choice="none",
                                max_tokens=4)
    assert not resp.choices[0].message.tool_calls and resp.choices[0].finish_reason in ("stop", "length")
    live_server.wait_idle()


def test_openai(live_server: Any) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny-mixtral", "open-mixtral-8x22b"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    resp = client.chat.completions.create(model="tiny-mixtral", messages=messages, max_tokens=5, temperature=0,
                                          seed=7, n=2)
    assert len(resp.choices) == 2 and resp.choices[0].message.content == resp.choices[1].message.content
    assert 2 <= resp.usage.completion_tokens <= 10

    stream = client.chat.completions.create(model="tiny-mixtral", messages=messages, max_tokens=5, temperature=0,
                                            seed=7, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == resp.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == resp.usage.completion_tokens // 2

    # OpenAI's spelling: tool_choice "required", a named function, max_completion_tokens; streamed tool calls.
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        resp = client.chat.completions.create(model="tiny-mixtral", messages=[{"role": "user", "content": "Paris?"}],
                                              tools=TOOLS, tool_choice=choice, max_completion_tokens=120,
                                              parallel_tool_calls=False)
        msg = resp.choices[0].message
        assert resp.choices[0].finish_reason == "tool_calls" and msg.content == ""
        _check_calls([{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                      for c in msg.tool_calls])
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(model="tiny-mixtral", messages=[{"role": "user", "content": "P?"}],
                                                tools=TOOLS, tool_choice="required", max_tokens=120,
                                                parallel_tool_calls=False, stream=True):
        for tc in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            entry = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += tc.id or ""
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert finish == "tool_calls"
    assert len(calls) == 1, "parallel_tool_calls=false allows exactly one call"
    _check_calls(list(calls.values()))

    # An OpenAI-style id ("call_...") in the history is mapped to a valid Mistral id, not refused.
    history = [{"role": "user", "content": "Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [{"id": "call_8f3e2a1b9c7d", "type": "function",
                                                                      "function": {"name": "get_weather",
                                                                                   "arguments": '{"unit": "c"}'}}]},
               {"role": "tool", "tool_call_id": "call_8f3e2a1b9c7d", "content": "21"}]
    resp = client.chat.completions.create(model="tiny-mixtral", messages=history, tools=TOOLS, max_tokens=3)
    assert resp.choices[0].finish_reason in ("stop", "length", "tool_calls")

    completion = client.completions.create(model="tiny-mixtral", prompt="Once upon a time", max_tokens=4,
                                           temperature=0)
    assert completion.choices[0].finish_reason in ("stop", "length") and completion.usage.completion_tokens <= 4
    live_server.wait_idle()


def _venv_042() -> Path:
    python = VENV_042 / "bin" / "python"
    if not python.exists():
        venv.create(VENV_042, with_pip=True)
        (VENV_042 / ".gitignore").write_text("*\n")
        subprocess.run([str(python), "-m", "pip", "install", "-q", "mistralai==0.4.2"], check=True, timeout=600)
    return python


def test_mistralai_042_documented_call(live_server: Any) -> None:
    python = _venv_042()
    proc = subprocess.run([str(python), str(Path(__file__).with_name("mistralai042_client.py")), live_server.url],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["models"] == ["tiny-mixtral", "open-mixtral-8x22b"]
    assert out["tool_finish"] == "tool_calls" and out["tool_content"] == ""
    _check_calls(out["tool_calls"])
    assert isinstance(out["round_trip_content"], str) and out["usage"] > 0
    assert out["stream_text"] == out["text"] and len(out["stream_finish"]) == 1
    live_server.wait_idle()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))

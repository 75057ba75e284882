"""Chat semantics over HTTP: stop strings, streaming == non-streaming, JSON response formats, logprobs, n,
prefix caching in usage, safe_prompt, assistant prefixes, and what a v1-tokenizer model does with ``tools``."""

from __future__ import annotations

import json
from typing import Any

import jsonschema

from mixtral.serve.chat import SAFE_PROMPT

USER = [{"role": "user", "content": "Write something"}]


def chat(server: Any, **body: Any) -> dict[str, Any]:
    with server.client() as client:
        resp = client.post("/v1/chat/completions", json={"model": "tiny-mixtral", "messages": USER, **body})
    assert resp.status_code == 200, resp.text
    return resp.json()


def chat_stream(server: Any, **body: Any) -> tuple[dict[int, str], dict[int, str], dict[str, Any] | None]:
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    usage = None
    with server.client() as client, client.stream("POST", "/v1/chat/completions", json={
            "model": "tiny-mixtral", "messages": USER, "stream": True, **body}) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                for choice in chunk["choices"]:
                    texts[choice["index"]] = texts.get(choice["index"], "") + (choice["delta"].get("content") or "")
                    if choice["finish_reason"]:
                        finishes[choice["index"]] = choice["finish_reason"]
                usage = chunk.get("usage") or usage
    return texts, finishes, usage


def test_stop_string_streaming_matches_non_streaming(live_server: Any) -> None:
    full = chat(live_server, max_tokens=24, temperature=0, ignore_eos=True)["choices"][0]["message"]["content"]
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip(), full
    expected = full[:full.index(stop)]
    resp = chat(live_server, max_tokens=24, temperature=0, stop=[stop])
    assert resp["choices"][0]["message"]["content"] == expected
    assert resp["choices"][0]["finish_reason"] == "stop"
    texts, finishes, usage = chat_stream(live_server, max_tokens=24, temperature=0, stop=stop)
    assert texts[0] == expected and finishes[0] == "stop"
    assert usage is not None and usage["completion_tokens"] == resp["usage"]["completion_tokens"]
    live_server.wait_idle()


def test_n_samples_stream_and_seed(live_server: Any) -> None:
    texts, finishes, usage = chat_stream(live_server, n=3, max_tokens=6, temperature=1.0, random_seed=11,
                                         ignore_eos=True)
    assert sorted(finishes) == [0, 1, 2] and set(finishes.values()) == {"length"}
    assert usage is not None and usage["completion_tokens"] == 18
    again = chat(live_server, n=3, max_tokens=6, temperature=1.0, random_seed=11, ignore_eos=True)
    assert [c["message"]["content"] for c in again["choices"]] == [texts[i] for i in range(3)]
    assert len(set(texts.values())) > 1, "samples of one request must differ"


def test_json_response_formats(live_server: Any) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0)
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}}
    for seed in range(3):
        resp = client.chat.completions.create(model="tiny-mixtral", messages=USER, response_format=fmt, seed=seed,
                                              max_tokens=80)
        assert resp.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(resp.choices[0].message.content), schema)
    resp = client.chat.completions.create(model="tiny-mixtral", messages=USER, seed=1, max_tokens=120,
                                          response_format={"type": "json_object"}, temperature=0)
    if resp.choices[0].finish_reason == "stop":  # a random model may write a long object; if it ends, it parses
        assert isinstance(json.loads(resp.choices[0].message.content), dict)
    live_server.wait_idle()


def test_logprobs(live_server: Any) -> None:
    resp = chat(live_server, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3, ignore_eos=True)
    content = resp["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    assert "".join(e["token"] for e in content).strip() == resp["choices"][0]["message"]["content"].strip()
    for entry in content:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry["logprob"] == max(t["logprob"] for t in entry["top_logprobs"])


def test_prefix_cache_in_usage_and_safe_prompt(live_server: Any) -> None:
    messages = [{"role": "user", "content": "A long shared question " * 8}]
    first = chat(live_server, messages=messages, max_tokens=2)
    second = chat(live_server, messages=messages, max_tokens=2)
    prompt = first["usage"]["prompt_tokens"]
    assert second["usage"]["prompt_tokens"] == prompt
    # Full 16-token blocks of the repeated prompt come from the cache.
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= (prompt - 1) // 16 * 16 > 0
    safe = chat(live_server, messages=messages, max_tokens=2, safe_prompt=True)
    assert safe["usage"]["prompt_tokens"] > prompt + len(SAFE_PROMPT.split()) // 2


def test_assistant_prefix_is_continued(live_server: Any) -> None:
    messages = [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "The colour",
                                                                "prefix": True}]
    resp = chat(live_server, messages=messages, max_tokens=3)
    assert resp["choices"][0]["finish_reason"] in ("stop", "length")


def test_v1_model_and_tools(server_factory: Any) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    with server_factory(model="tiny-v1", served_model_name="tiny-v1") as server, server.client() as client:
        card = client.get("/v1/models").json()["data"][0]
        assert card["capabilities"]["function_calling"] is False and "no function calling" in card["description"]
        base = {"model": "tiny-v1", "messages": USER, "max_tokens": 2}
        for choice in (None, "auto", "any"):
            body = {**base, "tools": tools, **({"tool_choice": choice} if choice else {})}
            resp = client.post("/v1/chat/completions", json=body)
            assert resp.status_code == 400, resp.text
            assert "tokenizer v1" in resp.json()["message"] and "tool_choice='none'" in resp.json()["message"]
        plain = client.post("/v1/chat/completions", json=base).json()
        none = client.post("/v1/chat/completions", json={**base, "tools": tools, "tool_choice": "none"}).json()
        assert none["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"], "tools must be dropped"
        history = [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "abcdefghi", "content": "1"}]
        resp = client.post("/v1/chat/completions", json={**base, "messages": history})
        assert resp.status_code == 400 and "no tool tokens" in resp.json()["message"]
        server.wait_idle()

"""Bad requests get the right status and a message naming what was wrong, and the server keeps answering.

Each row of ``CASES`` is (what, body, expected status, fragments the message must contain). The body is sent
raw (bytes) or as JSON. After the table, a normal request must still succeed and no engine block may be leaked.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

GOOD: dict[str, Any] = {"model": "tiny-mixtral", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"unit": {"enum": ["c", "f"]}}}}}


def body(**changes: Any) -> dict[str, Any]:
    out = {**GOOD, **changes}
    return {k: v for k, v in out.items() if v is not ...}


CASES: list[tuple[str, bytes | dict[str, Any], int, list[str]]] = [
    ("malformed JSON", b'{"model": "tiny-mixtral", "messages": [', 400, ["not valid JSON"]),
    ("non-UTF-8 body", b'{"model": "tiny-mixtral", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400,
     ["UTF-8"]),
    ("JSON array body", b"[1, 2]", 422, ["body"]),
    ("missing messages", body(messages=...), 422, ["messages", "field required"]),
    ("wrong type: messages", body(messages="hello"), 422, ["messages"]),
    ("wrong type: max_tokens", body(max_tokens="ten"), 422, ["max_tokens"]),
    ("wrong type: temperature", body(temperature=[1]), 422, ["temperature"]),
    ("unknown top-level field", body(max_token=5), 422, ["max_token", "unknown field"]),
    ("empty messages", body(messages=[]), 422, ["messages", "at least 1"]),
    ("unknown role", body(messages=[{"role": "robot", "content": "x"}]), 422, ["messages[0]"]),
    ("image content", body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]), 422,
     ["messages[0].content"]),
    ("bad role order: ends with assistant", body(messages=[{"role": "user", "content": "a"},
                                                           {"role": "assistant", "content": "b"}]), 400,
     ["messages"]),
    ("bad role order: tool result without a call", body(messages=[{"role": "tool", "tool_call_id": "abcdefghi",
                                                                   "content": "1"}]), 400, ["messages"]),
    ("continue_final_message after a user message", body(continue_final_message=True), 400,
     ["continue_final_message", "assistant"]),
    ("unknown tool in tool_choice", body(tools=[WEATHER], tool_choice={"type": "function",
                                                                      "function": {"name": "nope"}}), 400,
     ["tool_choice", "'nope'", "get_weather"]),
    # Valid field by field, impossible together (no schema can say it): 400, naming the field.
    ("tool_choice any without tools", body(tool_choice="any"), 400, ["tool_choice", "tools"]),
    ("duplicate tool names", body(tools=[WEATHER, WEATHER]), 400, ["get_weather", "unique"]),
    ("invalid tool schema", body(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "no-such-type"}}}}}]), 400,
     ["tools[0].function.parameters", "not a valid JSON Schema"]),
    ("invalid response_format schema", body(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": 12}}}), 400, ["response_format", "not a valid JSON Schema"]),
    ("json_schema without schema", body(response_format={"type": "json_schema"}), 422, ["json_schema"]),
    ("bad tool name", body(tools=[{"type": "function", "function": {"name": "has space"}}]), 422,
     ["tools[0].function.name"]),
    ("huge max_tokens", body(max_tokens=10**12), 400, ["max_tokens=1000000000000", "256"]),
    ("huge n", body(n=10**6), 422, ["n", "16"]),
    ("huge temperature", body(temperature=1e300), 422, ["temperature"]),
    ("negative top_p", body(top_p=-0.5), 422, ["top_p"]),
    ("seed past 63 bits", body(random_seed=2**70), 422, ["random_seed"]),
    ("seed and random_seed disagree", body(seed=1, random_seed=2), 400, ["seed", "random_seed"]),
    ("too many stop strings", body(stop=["x"] * 17), 422, ["stop"]),
    ("stop token outside vocab", body(stop_token_ids=[10**6]), 400, ["stop_token_ids", "1000000"]),
    ("unsupported field set", body(prediction={"type": "content", "content": "x"}), 422,
     ["prediction", "not supported"]),
    ("string for an integer", body(max_tokens="5"), 422, ["max_tokens"]),
    ("number for a boolean", body(stream=1), 422, ["stream"]),
    ("logit_bias id outside vocab", body(logit_bias={"999999": 1.0}), 400, ["logit_bias", "999999"]),
    ("logit_bias key not an id", body(logit_bias={"abc": 1.0}), 422, ["logit_bias"]),
    ("two output constraints", body(guided_regex="a+", guided_choice=["a"]), 400, ["guided_regex", "guided_choice"]),
    ("min_tokens above max_tokens", body(min_tokens=5, max_tokens=2), 400, ["min_tokens"]),
    ("over-long prompt", body(messages=[{"role": "user", "content": "hello " * 400}]), 400,
     ["prompt is", "tokens", "256"]),
    ("unknown model", body(model="gpt-4"), 404, ["gpt-4", "tiny-mixtral"]),
    ("top_logprobs without logprobs", body(top_logprobs=2), 400, ["top_logprobs"]),
]


@pytest.mark.parametrize(("what", "payload", "status", "fragments"), CASES, ids=[c[0] for c in CASES])
def test_bad_chat_request(live_server: Any, what: str, payload: Any, status: int, fragments: list[str]) -> None:
    with live_server.client() as client:
        if isinstance(payload, bytes):
            resp = client.post("/v1/chat/completions", content=payload, headers={"content-type": "application/json"})
        else:
            resp = client.post("/v1/chat/completions", json=payload)
        assert resp.status_code == status, (what, resp.text)
        err = resp.json()
        # Both shapes: Mistral's flat body and OpenAI's {"error": {...}}.
        assert err["object"] == "error" and err["error"]["message"] == err["message"], err
        for fragment in fragments:
            assert fragment in err["message"], (what, fragment, err["message"])
        # The server is still serving.
        ok = client.post("/v1/chat/completions", json=GOOD)
        assert ok.status_code == 200, ok.text


def test_bad_completion_and_other_endpoints(live_server: Any) -> None:
    with live_server.client() as client:
        cases = [
            (client.post("/v1/completions", json={"model": "tiny-mixtral", "prompt": ""}), 422, "prompt"),
            (client.post("/v1/completions", json={"model": "tiny-mixtral", "prompt": [1, 99999999]}), 400,
             "99999999"),
            (client.post("/v1/completions", json={"model": "tiny-mixtral", "prompt": "x", "suffix": "y"}), 422,
             "suffix"),
            (client.post("/v1/completions", json={"model": "tiny-mixtral", "prompt": "x", "max_tokens": 300}), 400,
             "256"),
            (client.get("/v1/models/nope"), 404, "nope"),
            (client.get("/v1/nothing-here"), 404, "no such endpoint"),
            (client.get("/v1/chat/completions"), 405, "Method Not Allowed"),
        ]
        for resp, status, fragment in cases:
            assert resp.status_code == status, resp.text
            assert fragment in resp.json()["message"], resp.text
        ok = client.post("/v1/completions", json={"model": "tiny-mixtral", "prompt": [1, 5000, 6000],
                                                  "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 3


def test_oversized_body_is_413(live_server: Any) -> None:
    limit = live_server.state.settings.max_body_bytes
    payload = json.dumps(body(messages=[{"role": "user", "content": "a" * (limit + 10)}])).encode()
    with live_server.client() as client:
        resp = client.post("/v1/chat/completions", content=payload, headers={"content-type": "application/json"})
        assert resp.status_code == 413 and str(limit) in resp.json()["message"]

        # Without Content-Length (chunked upload) the limit holds too.
        def chunks() -> Any:
            for i in range(0, len(payload), 65536):
                yield payload[i:i + 65536]

        resp = client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        assert resp.status_code == 413
    with live_server.client() as client:
        assert client.post("/v1/chat/completions", json=GOOD).status_code == 200
    stats = live_server.wait_idle()
    assert stats.num_free_blocks == stats.num_total_blocks

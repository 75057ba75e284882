"""Conversation histories as other OpenAI-compatible services write them: an assistant turn with text next to its
tool calls is accepted (the v3 prompt keeps the calls, as if the text were empty) instead of a 400."""

from __future__ import annotations

from typing import Any

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


def _history(content: Any) -> list[dict[str, Any]]:
    call = {"id": "call_Qx81KpLr0aZ7", "type": "function", "index": 0,
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
    return [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": content, "tool_calls": [call], "refusal": None},
            {"role": "tool", "tool_call_id": call["id"], "content": "22C"}]


def test_text_beside_tool_calls_is_accepted(live_server: Any) -> None:
    with live_server.client() as client:
        prompt_tokens = []
        for content in ("Let me check.", [{"type": "text", "text": "Let me check."}], "", None):
            resp = client.post("/v1/chat/completions", json={
                "model": "tiny-mixtral", "messages": _history(content), "tools": [WEATHER], "max_tokens": 2})
            assert resp.status_code == 200, (content, resp.text)
            prompt_tokens.append(resp.json()["usage"]["prompt_tokens"])
        assert len(set(prompt_tokens)) == 1, prompt_tokens  # the same prompt whatever the text was
    live_server.wait_idle()


def test_empty_reply_sent_back_is_accepted(live_server: Any) -> None:
    # The server answers "" when the model stops at once; a client that sends the history back must not get a 400.
    with live_server.client() as client:
        def prompt_tokens(messages: list[dict[str, Any]]) -> int:
            resp = client.post("/v1/chat/completions", json={"model": "tiny-mixtral", "messages": messages,
                                                             "max_tokens": 2})
            assert resp.status_code == 200, resp.text
            return resp.json()["usage"]["prompt_tokens"]

        merged = prompt_tokens([{"role": "user", "content": "Hi"}, {"role": "user", "content": "Still there?"}])
        for empty in ("", None, []):
            assert prompt_tokens([{"role": "user", "content": "Hi"},
                                  {"role": "assistant", "content": empty, "prefix": False},
                                  {"role": "user", "content": "Still there?"}]) == merged
        # As the last message it is still a conversation that ends with the assistant: refused, as before.
        resp = client.post("/v1/chat/completions", json={"model": "tiny-mixtral", "messages": [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]})
        assert resp.status_code == 400 and resp.json()["param"] == "messages"
    live_server.wait_idle()

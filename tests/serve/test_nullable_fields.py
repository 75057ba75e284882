"""Flags sent as JSON null (OpenAI's spec makes them nullable; clients that serialise every field send null)
mean their default instead of a 422."""

from __future__ import annotations

from typing import Any

from mixtral.serve.protocol import ChatCompletionRequest, CompletionRequest

USER = [{"role": "user", "content": "Hi"}]


def test_null_flags_take_their_defaults() -> None:
    chat = ChatCompletionRequest.model_validate({
        "model": "m", "messages": USER, "stream": None, "ignore_eos": None, "safe_prompt": None, "logprobs": None,
        "parallel_tool_calls": None})
    assert (chat.stream, chat.ignore_eos, chat.safe_prompt, chat.logprobs, chat.parallel_tool_calls) == \
        (False, False, False, False, True)
    completion = CompletionRequest.model_validate({"model": "m", "prompt": "x", "echo": None, "stream": None})
    assert completion.echo is False and completion.stream is False


def test_null_flags_over_http(live_server: Any) -> None:
    with live_server.client() as client:
        resp = client.post("/v1/chat/completions", json={
            "model": "tiny-mixtral", "messages": USER, "max_tokens": 2, "stream": None, "safe_prompt": None,
            "logprobs": None, "parallel_tool_calls": None, "ignore_eos": None})
        assert resp.status_code == 200 and resp.headers["content-type"] == "application/json", resp.text
        assert resp.json()["object"] == "chat.completion"
        resp = client.post("/v1/completions", json={"model": "tiny-mixtral", "prompt": "Hi", "max_tokens": 2,
                                                    "echo": None, "stream": None})
        assert resp.status_code == 200 and resp.json()["object"] == "text_completion", resp.text
        # A real boolean of the wrong type is still refused.
        bad = client.post("/v1/chat/completions", json={"model": "tiny-mixtral", "messages": USER, "stream": [1]})
        assert bad.status_code == 422 and bad.json()["param"] == "stream"
    live_server.wait_idle()

"""Per-token routing over HTTP: what chat and text completions return equals the model's own routing.

Against the live server over the tiny model: the reference is ``analysis.routing_capture.capture_routing`` on the
served model (prompt + generated tokens, one dense forward), row for row as serve/routing.py's contract says.
Non-streaming and streaming (the deltas' tokens joined give the whole answer's routing, the prompt's come once per
choice), n = 2, a forced tool call (its delta carries the call's routing), a batch of text prompts with echo,
scoring (``max_tokens: 0``), and requests without the fields, whose responses carry no ``routing`` key at all.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from mixtral.analysis.routing_capture import capture_routing

CHAT = {"model": "tiny-mixtral", "messages": [{"role": "user", "content": "Name three colours."}],
        "temperature": 0, "max_tokens": 12}
WEIGHT_ATOL = 2e-4  # the API rounds weights to 4 decimals; paged vs dense attention adds ~1e-6


def sse(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def check_against_model(server: Any, routing: dict[str, Any], prompt_ids: list[int] | None = None) -> None:
    """``routing`` (a ChoiceRouting) equals the served model's routing of the prompt and its tokens."""
    model = server.llm.model
    args = model.args
    assert routing["num_layers"] == args.n_layers and routing["top_k"] == args.num_experts_per_tok
    if routing.get("prompt_tokens") is not None:
        ids = [e["token_id"] for e in routing["prompt_tokens"]]
        assert prompt_ids is None or ids == prompt_ids
        prompt_ids = ids
    assert prompt_ids is not None
    generated = [e["token_id"] for e in routing["tokens"]]
    experts, weights, _ = capture_routing(model, prompt_ids + generated[:-1])  # [P + T - 1, L, k]
    p = len(prompt_ids)
    if routing.get("prompt_tokens") is not None:
        assert [e["experts"] for e in routing["prompt_tokens"]] == experts[:p].tolist()
        np.testing.assert_allclose([e["weights"] for e in routing["prompt_tokens"]], weights[:p], atol=WEIGHT_ATOL)
    assert [e["experts"] for e in routing["tokens"]] == experts[p - 1:].tolist()
    np.testing.assert_allclose([e["weights"] for e in routing["tokens"]], weights[p - 1:], atol=WEIGHT_ATOL)
    pieces = server.state.tokenizer.piece_texts
    assert [e["token"] for e in routing["tokens"]] == [pieces[t] for t in generated]


def joined(chunks: list[dict[str, Any]], index: int = 0) -> dict[str, Any]:
    """The routing of choice ``index`` from its stream chunks: every delta's tokens in order, the prompt's once."""
    tokens: list[dict[str, Any]] = []
    prompt = None
    for chunk in chunks:
        for choice in chunk["choices"]:
            if choice["index"] != index or "routing" not in choice:
                continue
            if "prompt_tokens" in choice["routing"]:
                assert prompt is None and not tokens, "the prompt's routing comes once, in the first routing chunk"
                prompt = choice["routing"]["prompt_tokens"]
            tokens += choice["routing"]["tokens"]
    return {"tokens": tokens, "prompt_tokens": prompt}


def test_chat_returns_the_models_routing(live_server: Any) -> None:
    with live_server.client() as client:
        body = client.post("/v1/chat/completions", json={**CHAT, "return_prompt_routing": True}).json()
        choice = body["choices"][0]
        routing = choice["routing"]
        assert len(routing["tokens"]) == body["usage"]["completion_tokens"]
        assert len(routing["prompt_tokens"]) == body["usage"]["prompt_tokens"]
        check_against_model(live_server, routing)
        # return_routing alone: the same generated routing, no prompt's.
        only = client.post("/v1/chat/completions", json={**CHAT, "return_routing": True}).json()["choices"][0]
        assert only["routing"]["tokens"] == routing["tokens"] and "prompt_tokens" not in only["routing"]
        # Streamed: the deltas' routing joined is the same.
        stream = client.post("/v1/chat/completions", json={**CHAT, "stream": True, "return_prompt_routing": True})
        chunks = sse(stream.text)
        assert joined(chunks) == {"tokens": routing["tokens"], "prompt_tokens": routing["prompt_tokens"]}
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert text == choice["message"]["content"]
    live_server.wait_idle()


def test_streamed_samples_each_carry_their_own_routing(live_server: Any) -> None:
    request = {**CHAT, "n": 2, "temperature": 1.0, "seed": 7, "stream": True, "return_prompt_routing": True}
    with live_server.client() as client:
        chunks = sse(client.post("/v1/chat/completions", json=request).text)
    per_choice = [joined(chunks, i) for i in range(2)]
    assert per_choice[0]["prompt_tokens"] == per_choice[1]["prompt_tokens"]
    assert per_choice[0]["tokens"] != per_choice[1]["tokens"]
    for routing in per_choice:
        check_against_model(live_server, {"num_layers": live_server.llm.model.args.n_layers,
                                          "top_k": live_server.llm.model.args.num_experts_per_tok, **routing})
    live_server.wait_idle()


def test_a_streamed_tool_call_carries_the_calls_routing(live_server: Any) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
        "required": ["city"], "additionalProperties": False}}}]
    request = {**CHAT, "max_tokens": 60, "tools": tools, "tool_choice": "any", "parallel_tool_calls": False,
               "return_routing": True, "stream_options": {"include_usage": True}}
    with live_server.client() as client:
        chunks = sse(client.post("/v1/chat/completions", json={**request, "stream": True}).text)
        whole = client.post("/v1/chat/completions", json=request).json()
    calls = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["delta"].get("tool_calls")]
    assert len(calls) == 1 and "routing" in calls[0]
    usage = chunks[-1]["usage"]
    assert len(calls[0]["routing"]["tokens"]) == usage["completion_tokens"]  # every token of the call, at once
    assert joined(chunks)["tokens"] == whole["choices"][0]["routing"]["tokens"]
    check_against_model(live_server, {**whole["choices"][0]["routing"]},
                        prompt_ids=_chat_prompt_ids(live_server, request))
    live_server.wait_idle()


def _chat_prompt_ids(server: Any, request: dict[str, Any]) -> list[int]:
    with server.client() as client:
        body = client.post("/v1/chat/completions", json={**request, "max_tokens": 1, "return_prompt_routing": True})
    return [e["token_id"] for e in body.json()["choices"][0]["routing"]["prompt_tokens"]]


def test_text_completions_batch_echo_and_stream(live_server: Any) -> None:
    tok = live_server.state.tokenizer
    prompts = ["The sky is", "Once upon a time"]
    request = {"model": "tiny-mixtral", "prompt": prompts, "temperature": 0, "max_tokens": 7, "echo": True,
               "return_prompt_routing": True}
    with live_server.client() as client:
        body = client.post("/v1/completions", json=request).json()
        stream = sse(client.post("/v1/completions", json={**request, "stream": True}).text)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for choice, prompt in zip(body["choices"], prompts, strict=True):
        check_against_model(live_server, choice["routing"], prompt_ids=tok.encode(prompt, bos=True))
        assert joined(stream, choice["index"]) == {"tokens": choice["routing"]["tokens"],
                                                    "prompt_tokens": choice["routing"]["prompt_tokens"]}
    live_server.wait_idle()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_scoring_returns_the_prompts_routing_only(live_server: Any, stream: bool) -> None:
    tok = live_server.state.tokenizer
    request = {"model": "tiny-mixtral", "prompt": "Scores are kept", "max_tokens": 0, "return_prompt_routing": True,
               "stream": stream}
    with live_server.client() as client:
        resp = client.post("/v1/completions", json=request)
    choice = (sse(resp.text)[-1] if stream else resp.json())["choices"][0]
    routing = choice["routing"]
    assert routing["tokens"] == []
    ids = tok.encode("Scores are kept", bos=True)
    assert [e["token_id"] for e in routing["prompt_tokens"]] == ids
    experts, _, _ = capture_routing(live_server.llm.model, ids)
    assert [e["experts"] for e in routing["prompt_tokens"]] == experts.tolist()
    live_server.wait_idle()


def test_without_the_fields_no_routing_key(live_server: Any) -> None:
    with live_server.client() as client:
        chat = client.post("/v1/chat/completions", json={**CHAT, "return_routing": None}).json()
        chat_stream = sse(client.post("/v1/chat/completions", json={**CHAT, "stream": True}).text)
        text = client.post("/v1/completions", json={"model": "tiny-mixtral", "prompt": "a", "max_tokens": 3}).json()
        text_stream = sse(client.post("/v1/completions", json={"model": "tiny-mixtral", "prompt": "a",
                                                                "max_tokens": 3, "stream": True}).text)
    choices = chat["choices"] + text["choices"] + [c for chunk in chat_stream + text_stream for c in chunk["choices"]]
    assert choices and all("routing" not in c for c in choices)
    live_server.wait_idle()

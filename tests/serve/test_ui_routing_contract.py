"""The per-token routing contract of the API (``serve/routing.py``): request fields, wire objects from the engine's
per-token arrays, stream deltas, validation of what the engine hands over, and the OpenAPI schema."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from mixtral.serve.protocol import ChatCompletionRequest, CompletionRequest
from mixtral.serve.responses import ChatCompletionChunk, ChatCompletionResponse
from mixtral.serve.routing import RoutingBuilder, token_routing

L, K, E = 3, 2, 8
PIECES = [f"<{i}>" for i in range(50)]


@dataclass
class Sample:
    """The shape of the engine's CompletionOutput with the routing hook filled."""

    index: int
    token_ids: list[int]
    routing_experts: Any = None
    routing_weights: Any = None


@dataclass
class Output:
    prompt_token_ids: list[int]
    outputs: list[Sample] = field(default_factory=list)
    prompt_routing_experts: Any = None
    prompt_routing_weights: Any = None


def arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    experts = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(n)])  # [n, L, K]
    w = rng.random((n, L, K)) + 0.1
    return experts, w / w.sum(-1, keepdims=True)


def builder(include_prompt: bool = False) -> RoutingBuilder:
    return RoutingBuilder(PIECES, num_layers=L, top_k=K, num_experts=E, include_prompt=include_prompt)


def test_request_fields_default_off_and_validate() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert not ChatCompletionRequest(**base).routing_wanted
    assert ChatCompletionRequest(**base, return_routing=True).routing_wanted
    assert ChatCompletionRequest(**base, return_prompt_routing=True).routing_wanted  # implies return_routing
    assert not ChatCompletionRequest(**base, return_routing=None, return_prompt_routing=None).routing_wanted
    assert CompletionRequest(model="m", prompt="a", return_routing=True).routing_wanted
    with pytest.raises(ValidationError, match="return_routing"):
        ChatCompletionRequest(**base, return_routing="sometimes")
    # Off: nothing to build.
    assert RoutingBuilder.for_request(ChatCompletionRequest(**base), None, None) is None


def test_entries_carry_each_tokens_experts_and_weights() -> None:
    experts, weights = arrays(4, 0)
    entries = token_routing([3, 4, 5, 6], experts, weights, PIECES, num_layers=L, top_k=K, num_experts=E)
    assert [e["token_id"] for e in entries] == [3, 4, 5, 6]
    assert [e["token"] for e in entries] == ["<3>", "<4>", "<5>", "<6>"]
    for t, entry in enumerate(entries):
        assert entry["experts"] == experts[t].tolist()
        assert np.allclose(entry["weights"], weights[t], atol=5e-5)
        assert all(isinstance(e, int) for row in entry["experts"] for e in row)
    # torch tensors and nested lists give the same entries
    same = token_routing([3, 4, 5, 6], torch.from_numpy(experts), torch.from_numpy(weights).float(), PIECES,
                         num_layers=L, top_k=K, num_experts=E)
    assert [e["experts"] for e in same] == [e["experts"] for e in entries]


@pytest.mark.parametrize(("experts_shape", "bad_id", "match"), [
    ((4, L + 1, K), None, r"\[tokens, layers, top_k\] = \[4, 3, 2\]"),
    ((3, L, K), None, r"\[4, 3, 2\], got experts \[3, 3, 2\]"),
    ((4, L), None, "must be \\[tokens, layers, top_k\\]"),
    ((4, L, K), E, f"expert id {E}, outside 0..{E - 1}"),
    ((4, L, K), -1, "expert id -1"),
])
def test_engine_arrays_that_do_not_fit_are_refused(experts_shape: tuple[int, ...], bad_id: int | None,
                                                    match: str) -> None:
    experts = np.zeros(experts_shape, dtype=np.int64)
    if bad_id is not None:
        experts[2, 1, 0] = bad_id
    with pytest.raises(ValueError, match=match):
        token_routing([1, 2, 3, 4], experts, np.zeros(experts_shape), PIECES, num_layers=L, top_k=K, num_experts=E)


def test_a_choice_holds_generated_and_asked_for_prompt_tokens() -> None:
    pe, pw = arrays(3, 1)
    ge, gw = arrays(2, 2)
    out = Output([1, 7, 8], prompt_routing_experts=pe, prompt_routing_weights=pw)
    sample = Sample(0, [9, 2], ge, gw)
    without = builder().choice(out, sample)
    assert without["num_layers"] == L and without["top_k"] == K and without["prompt_tokens"] is None
    assert [e["experts"] for e in without["tokens"]] == ge.tolist()
    with_prompt = builder(include_prompt=True).choice(out, sample)
    assert [e["token_id"] for e in with_prompt["prompt_tokens"]] == [1, 7, 8]
    assert [e["experts"] for e in with_prompt["prompt_tokens"]] == pe.tolist()
    # The wire object validates against the response schema (what OpenAPI documents).
    ChatCompletionResponse(id="x", created=0, model="m", usage={"prompt_tokens": 3, "completion_tokens": 2,
                                                                "total_tokens": 5},
                           choices=[{"index": 0, "message": {"content": ""}, "finish_reason": "stop",
                                     "routing": with_prompt}])


def test_missing_engine_routing_is_an_error_not_a_silent_gap() -> None:
    with pytest.raises(ValueError, match=r"no generated-token routing \(Sample.routing_experts"):
        builder().choice(Output([1]), Sample(0, [5]))
    ge, gw = arrays(1, 3)
    with pytest.raises(ValueError, match="no prompt routing"):
        builder(include_prompt=True).choice(Output([1]), Sample(0, [5], ge, gw))


def test_a_stream_sends_each_tokens_routing_once_and_the_prompt_first() -> None:
    pe, pw = arrays(2, 4)
    ge, gw = arrays(5, 5)
    out = Output([1, 4], prompt_routing_experts=pe, prompt_routing_weights=pw)
    stream = builder(include_prompt=True).stream(n=2)
    sent: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
    for step, upto in enumerate([1, 1, 3, 5]):  # cumulative outputs, as the engine yields them
        sample = Sample(0, [10 + t for t in range(upto)], ge[:upto], gw[:upto])
        delta = stream.delta(out, sample)
        if step == 1:
            assert delta is None  # nothing new
            continue
        assert delta is not None
        assert ("prompt_tokens" in delta) == (step == 0)
        sent[0].extend(delta["tokens"])
        ChatCompletionChunk(id="x", created=0, model="m",
                            choices=[{"index": 0, "delta": {"content": "a"}, "routing": delta}])
    assert [e["token_id"] for e in sent[0]] == [10, 11, 12, 13, 14]
    assert [e["experts"] for e in sent[0]] == ge.tolist()
    # The second choice gets its own prompt copy and cursor.
    first = stream.delta(out, Sample(1, [20], ge[:1], gw[:1]))
    assert first is not None and [e["token_id"] for e in first["prompt_tokens"]] == [1, 4]


def test_the_openapi_schema_documents_the_fields(live_server: Any) -> None:
    schema = live_server.client().get("/openapi.json").json()
    parts = schema["components"]["schemas"]
    for request in ("ChatCompletionRequest", "CompletionRequest"):
        props = parts[request]["properties"]
        assert props["return_routing"]["default"] is False and props["return_routing"]["type"] == "boolean"
        assert "implies" in props["return_prompt_routing"]["description"]
    assert {"num_layers", "top_k", "tokens", "prompt_tokens"} <= set(parts["ChoiceRouting"]["properties"])
    assert set(parts["TokenRouting"]["required"]) == {"token_id", "token", "experts", "weights"}
    assert "/v1/stats" in schema["paths"]

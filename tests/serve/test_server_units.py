"""Server pieces without a server: request schemas, error messages, tool-call output, context checks, model names,
metrics rendering."""

from __future__ import annotations

import json
import re

import pytest
import torch
from pydantic import ValidationError

from mixtral.model.presets import preset
from mixtral.serve.errors import APIError, validation_error
from mixtral.serve.metrics import ServerMetrics
from mixtral.serve.models import ServedModel
from mixtral.serve.params import check_context
from mixtral.serve.protocol import ChatCompletionRequest, CompletionRequest, content_text
from mixtral.serve.tools import new_tool_call_id, tool_calls_from_output
from mixtral.tokenizer import Tokenizer


def _errors(body: dict) -> APIError:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(body)
    return validation_error(info.value.errors())


def test_requests_echoed_back_by_clients_are_accepted() -> None:
    """What SDKs send back from earlier turns: prefix false, tool calls with index, null content, text chunks,
    OpenAI's developer role and names, Mistral's names."""
    req = ChatCompletionRequest.model_validate({
        "model": "m", "max_completion_tokens": 7, "seed": 3, "stop": "x", "user": "u", "metadata": {"a": 1},
        "stream_options": {"include_usage": True}, "parallel_tool_calls": False,
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
            {"role": "user", "content": "hi", "name": "bob"},
            {"role": "assistant", "content": None, "prefix": False, "refusal": None, "tool_calls": [
                {"id": "abcdefghi", "index": 0, "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "abcdefghi", "name": "f", "content": "1"},
        ],
    })
    assert req.effective_max_tokens == 7 and req.effective_seed == 3 and req.stop == ["x"]
    assert content_text(req.messages[0].content) == "be brief"
    assert req.tool_choice_or_default == "auto"
    assert CompletionRequest.model_validate({"model": "m", "prompt": [1, 2], "random_seed": 5}).effective_seed == 5


def test_validation_errors_name_the_field() -> None:
    err = _errors({"model": "m", "messages": [{"role": "user", "content": 5}]})
    assert err.status == 422 and err.param == "messages[0].content" and "messages[0].content" in err.message
    err = _errors({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokns": 3})
    assert err.param == "max_tokns" and "unknown field" in err.message
    # A tool schema that is not a valid JSON Schema: well-formed JSON, impossible to use -> 400 from check().
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]})
    with pytest.raises(APIError) as bad:
        req.check()
    assert bad.value.status == 400 and bad.value.param == "tools[0].function.parameters"
    assert "not a valid JSON Schema" in bad.value.message
    err = _errors({"model": "m", "messages": []})
    assert err.param == "messages" and err.detail and err.detail[0]["loc"] == ["messages"]


def test_tool_call_ids() -> None:
    ids = {new_tool_call_id() for _ in range(200)}
    assert len(ids) == 200 and all(re.fullmatch(r"[a-zA-Z0-9]{9}", i) for i in ids)


def test_tool_calls_from_output() -> None:
    tok = Tokenizer.from_version("v3")
    body = tok.encode('[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "f", "arguments": {}}]',
                      bos=False)
    ids = [tok.tool_calls_id, *body, tok.eos_id]
    calls = tool_calls_from_output(tok, ids, ["get_weather", "f"])
    assert calls is not None and [c.function.name for c in calls] == ["get_weather", "f"]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"} and calls[1].index == 1
    assert tool_calls_from_output(tok, ids, ["get_weather"]) is None  # a name the request did not offer
    assert tool_calls_from_output(tok, ids[:-6], ["get_weather", "f"]) is None  # cut off by max_tokens
    assert tool_calls_from_output(tok, body, ["get_weather", "f"]) is None  # text, not a call


def test_context_checks_give_both_numbers() -> None:
    assert check_context(10, None, 256) == 246
    assert check_context(10, 246, 256) == 246
    with pytest.raises(APIError) as info:
        check_context(10, 247, 256)
    assert info.value.status == 400 and "247" in info.value.message and "256" in info.value.message
    assert "max_tokens <= 246" in info.value.message
    with pytest.raises(APIError) as info:
        check_context(256, None, 256)
    assert "256 tokens" in info.value.message and info.value.param == "messages"


def test_model_names_and_cards() -> None:
    big = ServedModel("mixtral-8x22b-instruct", preset("mixtral-8x22b-instruct"), 65536, supports_tools=True)
    assert big.aliases == ["open-mixtral-8x22b"] and big.resolve("open-mixtral-8x22b") == "open-mixtral-8x22b"
    small = ServedModel("m", preset("mixtral-8x7b"), 32768, supports_tools=False, extra_aliases=["mine"])
    assert small.aliases == ["mine", "open-mixtral-8x7b"]
    card = small.card()
    assert card.type == "base" and not card.capabilities.function_calling and card.max_context_length == 32768
    with pytest.raises(APIError) as info:
        small.resolve("open-mixtral-8x22b")
    assert info.value.status == 404 and "open-mixtral-8x7b" in info.value.message
    assert ServedModel("t", preset("tiny"), 256, supports_tools=True).aliases == []


def test_metrics_render_engine_state_and_experts() -> None:
    metrics = ServerMetrics("m")
    stats = {"num_running": 3, "num_waiting": 2, "kv_cache_usage": 0.25, "prefix_cache_hit_rate": 0.5}
    counts = torch.tensor([[4, 4, 4, 4], [10, 2, 2, 2]])  # [L=2, E=4]
    metrics.attach_engine(lambda: stats, lambda: counts)
    metrics.first_token(0.05)
    metrics.inter_token(0.03, 3)
    metrics.finished("stop", prompt_tokens=7, cached_tokens=4, generated=4, e2e_s=0.2)
    text = metrics.render().decode()
    assert "mixtral_num_requests_running 3.0" in text and "mixtral_num_requests_waiting 2.0" in text
    assert "mixtral_kv_cache_usage_ratio 0.25" in text and "mixtral_prefix_cache_hit_rate 0.5" in text
    assert 'mixtral_expert_tokens_total{expert="0",layer="1"} 10.0' in text
    assert 'mixtral_expert_load_imbalance{layer="0"} 1.0' in text
    assert 'mixtral_expert_load_imbalance{layer="1"} 2.5' in text  # max 10 / mean 4
    assert 'mixtral_inter_token_latency_seconds_count{model_name="m"} 3.0' in text
    assert 'mixtral_requests_total{finish_reason="stop",model_name="m"} 1.0' in text
    assert 'mixtral_cached_prompt_tokens_total{model_name="m"} 4.0' in text

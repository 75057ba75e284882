"""What vLLM's clients send and read, over HTTP on the live server: the tokenizer endpoints, scoring completions
(batched prompts, echo + logprobs, max_tokens 0, prompt_logprobs), the usage chunk, every alias as a model, a tool
call cut by max_tokens, vLLM's constrained-output extras, logit_bias, chat-template switches, and the offline docs.

Logprob values are held to our own model's fp32 forward pass on the same ids here (the lm-eval test holds them to
transformers).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

MODEL = "tiny-mixtral"
USER = [{"role": "user", "content": "Hello there"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def reference(tiny_hf_checkpoint: Path) -> Any:
    from mixtral.checkpoint.loader import load_model

    return load_model(tiny_hf_checkpoint, dtype=torch.float32)


def _token_logprobs(model: Any, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1, from one forward pass."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids]))[0].double(), dim=-1)  # [T, V]
    return [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))]


def test_tokenizer_endpoints(live_server: Any) -> None:
    with live_server.client() as http:
        info = http.get("/tokenizer_info").json()
        assert info["bos_token"] == "<s>" and info["eos_token"] == "</s>" and info["model_max_length"] == 256
        # lm-eval finds the special ids by tokenizing their text.
        eos = http.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()
        assert eos["tokens"] == [2]
        plain = http.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
        assert plain["tokens"][0] == 1 and plain["count"] == len(plain["tokens"]) and plain["max_model_len"] == 256
        assert plain["token_strs"][0] == "<s>"
        text = http.post("/detokenize", json={"tokens": plain["tokens"][1:]}).json()["prompt"]
        assert text == "Hello world"
        again = http.post("/tokenize", json={"prompt": text, "add_special_tokens": True}).json()
        assert again["tokens"] == plain["tokens"]
        assert http.post("/detokenize", json={"tokens": [1, 3, 4]}).json()["prompt"] == "<s>[INST][/INST]"
        # Messages: the very ids a chat completion runs on (its usage counts them).
        chat = http.post("/tokenize", json={"messages": USER}).json()
        done = http.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "max_tokens": 1}).json()
        assert chat["count"] == done["usage"]["prompt_tokens"] and chat["tokens"][:2] == [1, 3]  # <s> [INST]
        bad = http.post("/detokenize", json={"tokens": [1, 10**6]})
        assert bad.status_code == 400 and "1000000" in bad.json()["message"]
        assert http.post("/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404


def test_scoring_completion_matches_the_model(live_server: Any, reference: Any) -> None:
    """lm-eval's request: token-id prompts in a batch, echo, logprobs 1, max_tokens 1 (and 0: no generation)."""
    prompts = [[1, 1500, 1600, 1700, 1800], [1, 99, 12000]]
    with live_server.client() as http:
        for max_tokens in (1, 0):
            resp = http.post("/v1/completions", json={"model": MODEL, "prompt": prompts, "max_tokens": max_tokens,
                                                       "logprobs": 1, "echo": True, "temperature": 0})
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert [c["index"] for c in body["choices"]] == [0, 1]
            for choice, ids in zip(body["choices"], prompts, strict=True):
                lp = choice["logprobs"]
                generated = len(lp["tokens"]) - len(ids)
                assert generated == max_tokens and (choice["finish_reason"] == "length")
                assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
                want = _token_logprobs(reference, ids)
                assert lp["token_logprobs"][1:len(ids)] == pytest.approx(want, abs=1e-4)
                for pos in range(1, len(ids)):
                    top = lp["top_logprobs"][pos]
                    assert lp["tokens"][pos] in top and 1 <= len(top) <= 2
                    assert max(top.values()) >= lp["token_logprobs"][pos]
                # text_offset: where each token string starts in the choice's text, from 0.
                lengths = [len(t) for t in lp["tokens"]]
                assert lp["text_offset"] == [sum(lengths[:i]) for i in range(len(lengths))]
            assert body["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)
            assert body["usage"]["completion_tokens"] == max_tokens * len(prompts)
    live_server.wait_idle()


def test_prompt_logprobs_on_completions_and_chat(live_server: Any, reference: Any) -> None:
    ids = [1, 1500, 1600, 1700]
    with live_server.client() as http:
        body = http.post("/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 1,
                                                  "prompt_logprobs": 2}).json()
        plp = body["choices"][0]["prompt_logprobs"]
        assert plp[0] is None and len(plp) == len(ids)
        want = _token_logprobs(reference, ids)
        for pos in range(1, len(ids)):
            entry = plp[pos]
            assert entry[str(ids[pos])]["logprob"] == pytest.approx(want[pos - 1], abs=1e-4)
            ranked = sorted((e for e in entry.values() if e.get("rank") is not None), key=lambda e: e["rank"])
            assert [e["rank"] for e in ranked][:2] == [1, 2]
            assert ranked[0]["logprob"] >= ranked[1]["logprob"]
        chat = http.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "max_tokens": 1,
                                                       "prompt_logprobs": 0}).json()
        prompt = http.post("/tokenize", json={"messages": USER}).json()["tokens"]
        assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == len(prompt)
        assert list(chat["prompt_logprobs"][1]) == [str(prompt[1])]


def _events(text: str) -> list[Any]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]


def test_include_usage_sends_a_last_chunk_without_choices(live_server: Any) -> None:
    with live_server.client() as http:
        for path, extra in (("/v1/chat/completions", {"messages": USER}), ("/v1/completions", {"prompt": ["a", "b"]})):
            resp = http.post(path, json={"model": MODEL, "max_tokens": 3, "stream": True, **extra,
                                         "stream_options": {"include_usage": True}})
            events = _events(resp.text)
            assert resp.text.rstrip().endswith("data: [DONE]")
            assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] >= 1
            assert all("usage" not in e for e in events[:-1]), path
            # Without it, Mistral's way: the usage rides on the chunk that finishes the reply.
            plain = _events(http.post(path, json={"model": MODEL, "max_tokens": 3, "stream": True, **extra}).text)
            assert plain[-1]["choices"] and plain[-1]["usage"]["total_tokens"] >= 1


def test_every_alias_is_a_model(live_server: Any) -> None:
    with live_server.client() as http:
        cards = http.get("/v1/models").json()["data"]
        assert [c["id"] for c in cards] == [MODEL, "open-mixtral-8x22b"]
        assert all(c["root"] == MODEL and c["max_model_len"] == 256 for c in cards)
        alias = http.get("/v1/models/open-mixtral-8x22b").json()
        assert alias["id"] == "open-mixtral-8x22b" and alias["aliases"] == [MODEL]


def test_tool_call_cut_by_max_tokens_stays_a_tool_call(live_server: Any) -> None:
    for stream in (False, True):
        with live_server.client() as http:
            resp = http.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "tools": [WEATHER],
                                                           "tool_choice": "any", "max_tokens": 6, "stream": stream})
        if stream:
            deltas = [c["choices"][0] for c in _events(resp.text) if c["choices"]]
            calls = [d["delta"]["tool_calls"] for d in deltas if d["delta"].get("tool_calls")]
            text = "".join(d["delta"].get("content") or "" for d in deltas)
            reason = deltas[-1]["finish_reason"]
            assert len(calls) == 1
            call = calls[0][0]
        else:
            choice = resp.json()["choices"][0]
            text, reason, call = choice["message"]["content"], choice["finish_reason"], \
                choice["message"]["tool_calls"][0]
        assert reason == "length" and text == ""
        # Six tokens into '[TOOL_CALLS] [{"name": "get_weather", "arguments": ...': the name is (partly) there.
        assert "get_weather".startswith(call["function"]["name"]) and len(call["id"]) == 9


def test_guided_extras(live_server: Any) -> None:
    with live_server.client() as http:
        def reply(**extra: Any) -> str:
            resp = http.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "max_tokens": 24,
                                                           "seed": 1, **extra})
            assert resp.status_code == 200, resp.text
            return resp.json()["choices"][0]["message"]["content"]

        assert reply(guided_choice=["yes", "no"]) in ("yes", "no")
        assert reply(structured_outputs={"choice": ["alpha", "beta"]}) in ("alpha", "beta")
        assert re.fullmatch(r"[0-9]{3}/[a-z]{1,3}", reply(guided_regex="[0-9]{3}/[a-z]{1,3}"))  # "/" escaped
        assert re.fullmatch(r"[0-9]{2}", reply(guided_regex="[0-9]{2}"))
        schema = {"type": "object", "properties": {"a": {"enum": [1, 2, 3]}, "b": {"type": "array", "items": {
            "type": "boolean"}, "maxItems": 2}}, "required": ["a", "b"], "additionalProperties": False}
        for extra in ({"guided_json": schema}, {"guided_json": json.dumps(schema)},
                      {"structured_outputs": {"json": schema}}):
            out = reply(max_tokens=60, **extra)
            value = json.loads(out)
            # The model's own compact style: exactly what json.dumps writes, no free whitespace.
            assert out == json.dumps(value), out
        # Completions take them too, with the exact text asked for (no leading space).
        text = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 5,
                                                  "guided_choice": ["cat", "dog"]}).json()["choices"][0]["text"]
        assert text in ("cat", "dog")
        bad = http.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "guided_json": "{not json"})
        assert bad.status_code == 400 and bad.json()["param"] == "guided_json"
    live_server.wait_idle()


def test_logit_bias_min_tokens_and_special_tokens(live_server: Any) -> None:
    with live_server.client() as http:
        piece = http.post("/v1/completions", json={"model": MODEL, "prompt": [1, 1234], "max_tokens": 1, "echo": True,
                                                   "logprobs": 0}).json()["choices"][0]["logprobs"]["tokens"][1]
        forced = http.post("/v1/completions", json={"model": MODEL, "prompt": [1, 500], "max_tokens": 4, "logprobs": 0,
                                                    "temperature": 0, "logit_bias": {"1234": 100}}).json()
        assert forced["choices"][0]["logprobs"]["tokens"] == [piece] * 4
        banned = http.post("/v1/completions", json={"model": MODEL, "prompt": [1, 500], "max_tokens": 4,
                                                    "temperature": 0, "logprobs": 0}).json()
        first = banned["choices"][0]["logprobs"]["tokens"][0]
        first_id = http.post("/tokenize", json={"prompt": first, "add_special_tokens": False}).json()["tokens"][-1]
        other = http.post("/v1/completions", json={"model": MODEL, "prompt": [1, 500], "max_tokens": 1,
                                                   "temperature": 0, "logprobs": 0,
                                                   "logit_bias": {str(first_id): -100}}).json()
        assert other["choices"][0]["logprobs"]["tokens"][0] != first
        # min_tokens: EOS cannot end the reply before it (the bias would otherwise make EOS the greedy choice).
        eos_first = {"model": MODEL, "prompt": [1, 500], "max_tokens": 5, "temperature": 0, "logit_bias": {"2": 100}}
        assert http.post("/v1/completions", json=eos_first).json()["usage"]["completion_tokens"] == 1
        assert http.post("/v1/completions", json={**eos_first, "min_tokens": 3}).json()["usage"][
            "completion_tokens"] >= 3
        # skip_special_tokens=false writes control tokens out.
        shown = http.post("/v1/completions", json={"model": MODEL, "prompt": [1, 500], "max_tokens": 2,
                                                   "temperature": 0, "logit_bias": {"3": 100},
                                                   "skip_special_tokens": False}).json()
        assert shown["choices"][0]["text"] == "[INST][INST]"


def test_continue_final_message(live_server: Any) -> None:
    history = [*USER, {"role": "assistant", "content": "Sure, the answer is"}]
    with live_server.client() as http:
        as_prefix = http.post("/tokenize", json={"messages": [*USER, {**history[1], "prefix": True}]}).json()
        for switch in ({"continue_final_message": True, "add_generation_prompt": False},
                       {"continue_final_message": True}, {"add_generation_prompt": False}):
            tokens = http.post("/tokenize", json={"messages": history, **switch}).json()
            assert tokens["tokens"] == as_prefix["tokens"], switch
            resp = http.post("/v1/chat/completions", json={"model": MODEL, "messages": history, "max_tokens": 2,
                                                           **switch})
            assert resp.status_code == 200 and resp.json()["usage"]["prompt_tokens"] == as_prefix["count"]
        both = http.post("/v1/chat/completions", json={"model": MODEL, "messages": history,
                                                       "continue_final_message": True, "add_generation_prompt": True})
        assert both.status_code == 400 and both.json()["param"] == "continue_final_message"


def test_docs_work_offline_and_the_document_resolves(live_server: Any) -> None:
    with live_server.client() as http:
        page = http.get("/docs")
        assert page.status_code == 200
        sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert sources and all(s.startswith("/") or s.startswith("data:") for s in sources), sources
        for asset in ("/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css"):
            resp = http.get(asset)
            assert resp.status_code == 200 and len(resp.content) > 10_000
        doc = http.get("/openapi.json").json()
    assert "/redoc" not in [r for r in doc["paths"]]
    assert doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"] == {
        "text/plain": {"schema": {"type": "string"}}}
    schemas = doc["components"]["schemas"]
    refs = re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(doc))
    assert refs and all(name in schemas for name in refs), sorted(set(refs) - set(schemas))
    events = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]["text/event-stream"]
    assert "ChatCompletionChunk" in json.dumps(events["itemSchema"])
    assert "bearerAuth" in doc["components"]["securitySchemes"]
    assert "security" not in doc["paths"]["/v1/chat/completions"]["post"]  # this server has no key


def test_batched_stream_hung_up_frees_every_request(live_server: Any) -> None:
    """A client that leaves a streamed batch part-way aborts all of its prompts' requests (blocks freed)."""
    import httpx2 as httpx

    body = {"model": MODEL, "prompt": [[1, 500], [1, 600], "three"], "max_tokens": 200, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=live_server.url, timeout=60) as http, \
            http.stream("POST", "/v1/completions", json=body) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                break  # one event, then hang up
    stats = live_server.wait_idle()
    assert stats.num_free_blocks == stats.num_total_blocks

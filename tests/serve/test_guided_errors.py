"""Constrained decoding: request validation (GuideError messages), tool-call parsing, the llguidance vocabulary."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
import torch
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mixtral.guide import bitmask_words
from mixtral.serve.guided import BanTokensGuide, GuideError, LLGuide, build_guide, parse_tool_calls
from mixtral.serve.llg_vocab import llg_vocab
from mixtral.tokenizer import Tokenizer

WEATHER = {
    "type": "object",
    "properties": {"location": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["location"],
}


def tool(name: str, parameters: object = WEATHER) -> dict:
    return {"type": "function", "function": {"name": name, "description": "d", "parameters": parameters}}


def json_schema(schema: object) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def v3() -> Tokenizer:
    return Tokenizer.from_version("v3")


@pytest.fixture(scope="module")
def v1() -> Tokenizer:
    return Tokenizer.from_version("v1")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tools": [tool("f", {"type": "strin"})]}, r"tools\[0\]\.function\.parameters.* not a valid JSON schema"),
        (
            {"tools": [tool("f"), tool("g", {"type": "object", "properties": {"a": {"type": 5}}})]},
            r"tools\[1\]\.function\.parameters\['properties'\]\['a'\]\['type'\] is not a valid JSON schema",
        ),
        ({"response_format": json_schema({"type": "object", "required": "a"})}, r"json_schema\.schema\['required'\]"),
        ({"response_format": json_schema({"type": "array", "uniqueItems": True})}, r"cannot enforce.*uniqueItems"),
        ({"response_format": json_schema({"type": "string", "format": "shoe-size"})}, r"Unknown format: shoe-size"),
        ({"response_format": json_schema(False)}, r"schema is `false`"),
        ({"response_format": json_schema([1, 2])}, r"must be a JSON schema object, got list"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, r"schema is required"),
        ({"response_format": {"type": "yaml"}}, r"response_format\.type must be .* got 'yaml'"),
        ({"tools": [tool("f")], "tool_choice": {"type": "function", "function": {"name": "g"}}}, r"'g'.*\['f'\]"),
        ({"tools": [tool("f")], "tool_choice": "sometimes"}, r"tool_choice must be .* got 'sometimes'"),
        ({"tools": [tool("f")], "tool_choice": {"type": "function"}}, r"tool_choice must be a string or"),
        ({"tool_choice": "any"}, r"tool_choice is 'any' but the request has no tools"),
        ({"tools": [], "tool_choice": {"function": {"name": "f"}}}, r"names the tool 'f' but the request has no tools"),
        ({"tools": [tool("f"), tool("f")]}, r"tools\[1\]\.function\.name 'f' is defined twice"),
        ({"tools": [tool("get weather")]}, r"tools\[0\]\.function\.name must match .* got 'get weather'"),
        ({"tools": [tool("f", {"type": "string"})]}, r"parameters must describe an object .* got type 'string'"),
        ({"tools": [{"type": "retrieval"}]}, r"tools\[0\]\.type must be 'function', got 'retrieval'"),
        ({"tools": "f"}, r"tools must be a list, got str"),
    ],
)
def test_bad_requests_raise_guide_error_naming_the_field(v3: Tokenizer, kwargs: dict, message: str) -> None:
    with pytest.raises(GuideError, match=message):
        build_guide(v3, **kwargs)


def test_guide_error_is_a_value_error() -> None:
    assert issubclass(GuideError, ValueError)


def test_unconstrained_requests_get_no_guide(v3: Tokenizer) -> None:
    assert build_guide(v3) is None
    assert build_guide(v3, response_format={"type": "text"}) is None
    assert build_guide(v3, tools=[], tool_choice="auto") is None
    assert build_guide(v3, tools=None, tool_choice="none") is None
    assert isinstance(build_guide(v3, tools=[tool("f")], tool_choice="none"), BanTokensGuide)
    assert isinstance(build_guide(v3, tools=[tool("f")], tool_choice="none", response_format={"type": "json_object"}),
                      LLGuide)


def test_v1_tokenizer_has_no_tool_calls(v1: Tokenizer) -> None:
    with pytest.raises(GuideError, match=r"tokenizer \(v1\) has no \[TOOL_CALLS\] token"):
        build_guide(v1, tools=[tool("f")], tool_choice="auto")
    with pytest.raises(GuideError, match=r"v1"):
        build_guide(v1, tools=[tool("f")], tool_choice="any")
    assert build_guide(v1, tools=[tool("f")], tool_choice="none") is None  # nothing to ban
    assert parse_tool_calls(v1, v1.encode('[{"name": "f", "arguments": {}}]', bos=False)) is None


def test_v1_json_schema_guide_works(v1: Tokenizer) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    guide = build_guide(v1, response_format=json_schema(schema))
    assert isinstance(guide, LLGuide)
    for text in ['{"n": 7}', '{"n": 3}']:  # the compact style json.dumps writes
        g = guide.copy()
        for t in v1.encode(text, bos=False):
            g.accept_token(t)
        assert g.is_accepting()
    g = guide.copy()
    with pytest.raises(GuideError, match="doesn't satisfy the grammar"):
        for t in v1.encode('{"n": 12}', bos=False):
            g.accept_token(t)


def test_parse_tool_calls(v3: Tokenizer) -> None:
    def ids(text: str) -> list[int]:
        return [v3.tool_calls_id, *v3.encode(text, bos=False), v3.eos_id]

    calls = '[{"name": "f", "arguments": {"a": [1, {"b": "é😀"}]}}, {"name": "g", "arguments": {}}]'
    assert parse_tool_calls(v3, ids(calls)) == [
        {"name": "f", "arguments": {"a": [1, {"b": "é😀"}]}},
        {"name": "g", "arguments": {}},
    ]
    # a JSON-encoded arguments string, a call id from the v3 training format, a single call without brackets
    odd = '[{"name": "f", "arguments": "{\\"x\\": 1}", "id": "abcdefghi"}]'
    assert parse_tool_calls(v3, ids(odd)) == [{"name": "f", "arguments": {"x": 1}}]
    assert parse_tool_calls(v3, ids('{"name": "f", "arguments": {"x": 2}}')) == [{"name": "f", "arguments": {"x": 2}}]
    for bad in ['[{"name": "f", "arguments": {"x": 1', "[]", '[{"arguments": {}}]', '[{"name": "f", "arguments": 3}]',
                'Sure! [{"name": "f"}]', '[{"name": "f", "arguments": "{oops"}]']:
        assert parse_tool_calls(v3, ids(bad)) is None, bad
    assert parse_tool_calls(v3, v3.encode(calls, bos=False)) is None  # no [TOOL_CALLS]: text
    assert parse_tool_calls(v3, []) is None


def test_mistral_common_tokenizer_gives_the_same_vocabulary(v3: Tokenizer) -> None:
    ours, theirs = llg_vocab(v3), llg_vocab(MistralTokenizer.v3())
    assert ours.token_bytes == theirs.token_bytes
    assert ours.control_ids == theirs.control_ids
    assert (ours.tool_calls_id, ours.eos_id, ours.vocab_size) == (5, 2, 32768)
    guide = build_guide(MistralTokenizer.v3(), tools=[tool("f")], tool_choice="any")
    for t in [5, *v3.encode('[{"name": "f", "arguments": {"location": "Oslo"}}]', bos=False)]:
        guide.accept_token(t)
    assert guide.is_finished()


def test_vocabulary_bytes_match_the_tokenizer(v3: Tokenizer) -> None:
    vocab = llg_vocab(v3)
    assert vocab.token_bytes[v3.encode("\n", bos=False)[-1]] == b"\n"  # byte fallback <0x0A>
    assert 5 in vocab.control_ids and vocab.token_bytes[5] == b""
    for text in ['{"a": "b c"}', "  two  spaces", "é中😀\ttab", "[TOOL_CALLS] as plain text"]:
        ids = v3.encode(text, bos=False)
        assert vocab.decode_bytes(ids) == b" " + text.encode()  # SentencePiece's dummy-prefix space
        assert vocab.ll_tokenizer.decode_bytes(vocab.ll_tokenizer.tokenize_str(text)) == text.encode()
        assert 5 not in vocab.ll_tokenizer.tokenize_str(text)  # control tokens never come from text


def test_masks_filled_on_threads_match_sequential(v3: Tokenizer) -> None:
    """The engine fills rows on worker threads while the forward runs: results must not depend on that."""
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}}}}
    template = build_guide(v3, tools=[tool("f", schema), tool("g")], tool_choice="any")
    guides = []
    for k in range(8):  # 8 sequences in different states
        guide = template.copy()
        text = '[{"name": "f", "arguments": {"a": [' + ", ".join(str(i) for i in range(k)) if k % 2 else '[{"name": "g'
        for t in [5, *v3.encode(text, bos=False)]:
            guide.accept_token(t)
        guides.append(guide)
    words = bitmask_words(v3.vocab_size)
    sequential = torch.zeros(len(guides), words, dtype=torch.int32)  # [B, W]
    for i, g in enumerate(guides):
        g.copy().fill_bitmask(sequential[i])
    threaded = torch.zeros(len(guides), words, dtype=torch.int32)  # [B, W]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: guides[i].fill_bitmask(threaded[i]), range(len(guides))))
    assert torch.equal(sequential, threaded)
    assert len({tuple(r.tolist()) for r in threaded}) > 2  # the states really differ


def test_required_tool_call_round_trips_through_parse(v3: Tokenizer) -> None:
    """Walk the grammar along the exact text the model was trained to write, then parse it back."""
    guide = build_guide(v3, tools=[tool("get_weather"), tool("f")], tool_choice="required")
    text = '[{"name": "get_weather", "arguments": {"location": "Paris, France", "unit": "celsius"}}]'
    ids = [5, *v3.encode(text, bos=False)]
    for t in ids:
        guide.accept_token(t)
    assert guide.is_finished()
    calls = parse_tool_calls(v3, [*ids, v3.eos_id])
    assert calls == [{"name": "get_weather", "arguments": json.loads(text)[0]["arguments"]}]
    jsonschema.validate(calls[0]["arguments"], WEATHER)

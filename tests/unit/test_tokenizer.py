"""Tokenizer wrapper: ids and control tokens per version, plain encode/decode, token bytes, and chat encoding
held identical to mistral-common's own ``encode_chat_completion(ChatCompletionRequest(...))``."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mixtral.tokenizer import ChatEncodingError, Tokenizer, normalize_tool_call_id

WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
    "required": ["city"],
}
WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER_PARAMS},
}


@pytest.fixture(scope="module")
def v1() -> Tokenizer:
    return Tokenizer.from_version("v1")


@pytest.fixture(scope="module")
def v3() -> Tokenizer:
    return Tokenizer.from_version("v3")


def reference_ids(version: str, request: ChatCompletionRequest) -> list[int]:
    mt = MistralTokenizer.v1() if version == "v1" else MistralTokenizer.v3()
    return list(mt.encode_chat_completion(request).tokens)


# ---------------------------------------------------------------------------- ids and plain text
def test_v1_ids(v1: Tokenizer) -> None:
    assert (v1.version, v1.vocab_size, v1.bos_id, v1.eos_id) == ("v1", 32000, 1, 2)
    assert v1.inst_id is None and v1.tool_calls_id is None and v1.tool_results_end_id is None
    assert not v1.supports_tools
    assert [i for i in range(v1.vocab_size) if v1.is_control(i)] == [1, 2]


def test_v3_ids(v3: Tokenizer) -> None:
    assert (v3.version, v3.vocab_size, v3.bos_id, v3.eos_id) == ("v3", 32768, 1, 2)
    got = (v3.inst_id, v3.inst_end_id, v3.tool_calls_id, v3.available_tools_id, v3.available_tools_end_id,
           v3.tool_results_id, v3.tool_results_end_id)
    assert got == (3, 4, 5, 6, 7, 8, 9)
    assert v3.supports_tools
    assert v3.mistral_tokenizer.instruct_tokenizer.tokenizer.n_words == v3.vocab_size
    assert v3.is_control(3) and not v3.is_control(v3.encode("Hi", bos=False)[0])


def test_v3_ordinary_ids_are_v1_plus_768(v1: Tokenizer, v3: Tokenizer) -> None:
    text = "Mixtral routes tokens to 2 of 8 experts. 中文 😀"
    assert [i + 768 for i in v1.encode(text, bos=False)] == v3.encode(text, bos=False)


def test_encode_bos_eos_and_roundtrip(v3: Tokenizer) -> None:
    text = "Hello world\n\tcafé 中 😀"
    ids = v3.encode(text, bos=True, eos=True)
    assert ids[0] == v3.bos_id and ids[-1] == v3.eos_id
    assert v3.decode(ids) == text
    assert v3.encode(text, bos=False) == ids[1:-1]


def test_decode_keep_special(v3: Tokenizer) -> None:
    ids = v3.encode_chat([{"role": "user", "content": "Hi"}])
    assert v3.decode(ids, skip_special=False) == "<s>[INST] Hi[/INST]"
    assert v3.decode(ids) == "Hi"


def test_decode_rejects_out_of_range(v1: Tokenizer) -> None:
    with pytest.raises(ValueError, match="32000"):
        v1.decode([5, 32000])


def test_token_bytes(v1: Tokenizer, v3: Tokenizer) -> None:
    hello = v3.encode("Hello", bos=False)
    assert len(hello) == 1 and v3.token_bytes(hello[0]) == b" Hello"  # the dummy-prefix space is kept
    assert v3.token_bytes(v3.bos_id) == b"" and v3.token_bytes(v3.tool_calls_id) == b""
    byte_e4 = v1.encode("\U0001f9ec", bos=False)  # rare emoji: spelled with byte-fallback pieces
    assert b"".join(v1.token_bytes(i) for i in byte_e4) == " \U0001f9ec".encode()
    assert all(v1.id_to_piece(i).startswith("<0x") for i in byte_e4[-4:])
    assert v1.token_bytes(v1.encode("\n", bos=False)[-1]) == b"\n"


def test_token_bytes_concatenate_to_text(v3: Tokenizer) -> None:
    text = "def f(x):\n    return {'a': [1, 2]}  # ünïcødé ✓"
    ids = v3.encode(text, bos=False)
    assert b"".join(v3.token_bytes(i) for i in ids).decode() == " " + text


def test_from_file_and_for_model(tmp_path) -> None:
    from pathlib import Path

    import mistral_common

    data = Path(mistral_common.__file__).parent / "data"
    tok = Tokenizer.from_file(data / "mistral_instruct_tokenizer_240323.model.v3")
    assert tok.version == "v3" and tok.vocab_size == 32768
    # for_model reads the checkpoint's own file; a file that contradicts the args' version is an error
    source = SimpleNamespace(tokenizer_file=data / "tokenizer.model.v1", args=SimpleNamespace(tokenizer="v1"))
    assert Tokenizer.for_model(source).version == "v1"
    source = SimpleNamespace(tokenizer_file=data / "tokenizer.model.v1", args=SimpleNamespace(tokenizer="v3"))
    with pytest.raises(ValueError, match=r"tokenizer\.model\.v1 has 32000 ids"):
        Tokenizer.for_model(source)
    source = SimpleNamespace(tokenizer_file=None, args=SimpleNamespace(tokenizer="v3"))
    assert Tokenizer.for_model(source).version == "v3"
    # a bare tokenizer.model (as Hub repos ship it): the version follows from the vocabulary size
    import shutil

    for name, version in (("mistral_instruct_tokenizer_240323.model.v3", "v3"), ("tokenizer.model.v1", "v1")):
        bare = tmp_path / version / "tokenizer.model"
        bare.parent.mkdir()
        shutil.copyfile(data / name, bare)
        tok = Tokenizer.from_file(bare)
        assert tok.version == version
        chat = [{"role": "user", "content": "Hi"}]
        assert tok.encode_chat(chat) == Tokenizer.from_version(version).encode_chat(chat)
    assert Tokenizer.for_model(SimpleNamespace(tokenizer_file=tmp_path / "v3" / "tokenizer.model",
                                               args=SimpleNamespace(tokenizer="v3"))).inst_id == 3
    with pytest.raises(ValueError, match="32000 ids"):
        Tokenizer.from_file(tmp_path / "v1" / "tokenizer.model", version="v3")
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.from_file(tmp_path / "nope.model.v3")
    with pytest.raises(ValueError, match="SentencePiece"):
        Tokenizer.from_file(data / "tekken_240718.json")
    with pytest.raises(ValueError, match="v2x"):
        Tokenizer.from_version("v2x")


# ---------------------------------------------------------------------------- chat parity with mistral-common
def test_chat_v1_plain_multiturn(v1: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    expected = reference_ids("v1", ChatCompletionRequest(messages=[
        SystemMessage(content="You are terse."), UserMessage(content="Hi"),
        AssistantMessage(content="Hello!"), UserMessage(content="Bye"),
    ]))
    ids = v1.encode_chat(messages)
    assert ids == expected
    assert v1.decode(ids, skip_special=False) == "<s> [INST] You are terse.\n\nHi [/INST] Hello!</s> [INST] Bye [/INST]"


def test_chat_v3_system_multiturn(v3: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": " 2+2?"}]},
        {"role": "assistant", "content": "Quatre."},
        {"role": "user", "content": "And 3+3?"},
    ]
    expected = reference_ids("v3", ChatCompletionRequest.from_openai(messages))
    ids = v3.encode_chat(messages)
    assert ids == expected
    # the system prompt goes on the last user turn in v3
    assert v3.decode(ids, skip_special=False).endswith("[INST] Answer in French.\n\nAnd 3+3?[/INST]")


def test_chat_v3_tools_call_and_result(v3: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Use tools when useful."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "abcDEF123", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}},
        ]},
        {"role": "tool", "tool_call_id": "abcDEF123", "name": "get_weather", "content": '{"temp": 21}'},
    ]
    expected = reference_ids("v3", ChatCompletionRequest(
        messages=[
            SystemMessage(content="Use tools when useful."),
            UserMessage(content="Weather in Paris?"),
            AssistantMessage(tool_calls=[ToolCall(id="abcDEF123", function=FunctionCall(
                name="get_weather", arguments={"city": "Paris", "unit": "C"}))]),
            ToolMessage(tool_call_id="abcDEF123", name="get_weather", content='{"temp": 21}'),
        ],
        tools=[Tool(function=Function(name="get_weather", description="Current weather in a city",
                                      parameters=WEATHER_PARAMS))],
    ))
    ids = v3.encode_chat(messages, tools=[WEATHER_TOOL])
    assert ids == expected
    for control in (v3.available_tools_id, v3.available_tools_end_id, v3.tool_calls_id, v3.tool_results_id,
                    v3.tool_results_end_id):
        assert ids.count(control) == 1
    # arguments given as a dict encode the same as the JSON string
    messages[2]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris", "unit": "C"}
    assert v3.encode_chat(messages, tools=[WEATHER_TOOL]) == expected


def test_chat_v3_tools_only_and_prefix(v3: Tokenizer) -> None:
    messages = [{"role": "user", "content": "Weather?"}]
    expected = reference_ids("v3", ChatCompletionRequest(
        messages=[UserMessage(content="Weather?")],
        tools=[Tool(function=Function(name="get_weather", description="Current weather in a city",
                                      parameters=WEATHER_PARAMS))],
    ))
    assert v3.encode_chat(messages, tools=[WEATHER_TOOL]) == expected
    prefixed = [*messages, {"role": "assistant", "content": "Sure", "prefix": True}]
    expected = reference_ids("v3", ChatCompletionRequest(
        messages=[UserMessage(content="Weather?"), AssistantMessage(content="Sure", prefix=True)]))
    ids = v3.encode_chat(prefixed)
    assert ids == expected and ids[-1] != v3.eos_id


def test_chat_long_tool_call_ids_are_mapped_consistently(v3: Tokenizer) -> None:
    openai_id = "call_9f8e7d6c5b4a3f2e1d0c"
    messages = [
        {"role": "user", "content": "Weather in Oslo and Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": openai_id, "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
        ]},
        {"role": "tool", "tool_call_id": openai_id, "content": "-3"},
        {"role": "tool", "tool_call_id": "call_2", "content": "18"},
    ]
    ids = v3.encode_chat(messages, tools=[WEATHER_TOOL])
    text = v3.decode(ids)
    short = normalize_tool_call_id(openai_id)
    assert len(short) == 9 and short.isalnum() and short == normalize_tool_call_id(openai_id)
    assert short != normalize_tool_call_id("call_2")
    assert text.count(short) == 2 and text.count(normalize_tool_call_id("call_2")) == 2
    assert normalize_tool_call_id("abcDEF123") == "abcDEF123"


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "non-empty"),
        ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
        ([{"content": "x"}], "unknown role None"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}], "text-only"),
        ([{"role": "user", "content": 5}], "content must be"),
        ([{"role": "assistant", "content": "x"}], "invalid chat request"),
        ([{"role": "user", "content": "a"}, {"role": "tool", "tool_call_id": "abcdefghi", "content": "r"}],
         "invalid chat request"),
        ([{"role": "user", "content": "a"}, {"role": "tool", "content": "r"}], "tool_call_id"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": "{}"}}]}], "no 'id'"),
        ([{"role": "user", "content": "a", "prefix": True}], "prefix"),
    ],
)
def test_chat_bad_input(v3: Tokenizer, messages: list, match: str) -> None:
    with pytest.raises(ChatEncodingError, match=match):
        v3.encode_chat(messages)


def test_chat_v1_refuses_tools(v1: Tokenizer) -> None:
    with pytest.raises(ChatEncodingError, match="no tool tokens"):
        v1.encode_chat([{"role": "user", "content": "hi"}], tools=[WEATHER_TOOL])
    call = {"id": "abcdefghi", "type": "function", "function": {"name": "f", "arguments": json.dumps({})}}
    with pytest.raises(ChatEncodingError, match="no tool tokens"):
        v1.encode_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call]}])
    assert isinstance(ChatEncodingError("x"), ValueError)

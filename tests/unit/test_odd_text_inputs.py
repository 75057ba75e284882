"""Text that is not valid Unicode for UTF-8 reaches the tokenizer cleanly.

Lone UTF-16 surrogates get into Python strings from JSON escapes (``"\\udcff"``) and from bytes decoded with
``surrogateescape`` (a C locale's stdin and argv); SentencePiece cannot take them. Non-UTF-8 bytes piped into
``mixtral generate -`` / ``mixtral chat`` are read as U+FFFD, not a traceback.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import pytest

from mixtral.cli import generate as generate_cli
from mixtral.cli.main import main
from mixtral.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def v3() -> Tokenizer:
    return Tokenizer.from_version("v3")


def test_lone_surrogates_encode_as_the_replacement_character(v3: Tokenizer) -> None:
    assert v3.encode("caf\udce9 ok") == v3.encode("caf\ufffd ok")
    assert v3.encode("\ud83d") == v3.encode("\ufffd")


def test_chat_with_lone_surrogates_anywhere_encodes(v3: Tokenizer) -> None:
    tools = [{"type": "function", "function": {"name": "f", "description": "d\udc80",
                                                "parameters": {"type": "object", "properties": {}}}}]

    def conversation(bad: str) -> list[dict[str, Any]]:
        return [
            {"role": "system", "content": f"sys{bad}"},
            {"role": "user", "content": [{"type": "text", "text": f"hi{bad}"}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": f'{{"a": "{bad}"}}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": f"not json {bad}"},
        ]

    got = v3.encode_chat(conversation("\udcff"), tools)
    want = v3.encode_chat(conversation("\ufffd"), [{**tools[0], "function": {
        **tools[0]["function"], "description": "d\ufffd"}}])
    assert got == want


class EchoLLM:
    """Records the prompt ``generate`` passes on and replies with a fixed text."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.prompts: list[Any] = []

    def stream(self, prompt: Any, params: Any) -> Iterator[Any]:
        self.prompts.append(prompt)
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        yield SimpleNamespace(finished=True, outputs=[SimpleNamespace(text=f"{len(ids)}", finish_reason="stop")])


def _strict_stdin(data: bytes) -> io.TextIOWrapper:
    """A stdin like a UTF-8 terminal's: strict decoding over a byte buffer."""
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="strict")


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])
def test_generate_reads_non_utf8_stdin(monkeypatch, capsys, v3: Tokenizer, errors: str) -> None:
    llm = EchoLLM(v3)
    monkeypatch.setattr(generate_cli, "build_llm", lambda args: llm)
    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9 \xff\xfe ok \xf0\x9f\x98\x80"), encoding="utf-8", errors=errors)
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["generate", "-", "--temperature", "0"]) == 0
    assert llm.prompts == ["caf\ufffd \ufffd\ufffd ok \U0001F600"]
    assert capsys.readouterr().out == f"{len(v3.encode(llm.prompts[0]))}\n"


def test_chat_reads_non_utf8_lines(monkeypatch, capsys, v3: Tokenizer) -> None:
    llm = EchoLLM(v3)
    monkeypatch.setattr(generate_cli, "build_llm", lambda args: llm)
    monkeypatch.setattr(sys, "stdin", _strict_stdin(b"hi \xff there\r\n/exit\n"))
    assert main(["chat", "--temperature", "0"]) == 0
    want: Sequence[int] = v3.encode_chat([{"role": "user", "content": "hi \ufffd there"}])
    assert llm.prompts == [want]
    assert "error" not in capsys.readouterr().err

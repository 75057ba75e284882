"""Tool calls in Mixtral's native format -> API ``tool_calls``, and the 9-character call ids.

A v3-tokenizer model calls tools by emitting the ``[TOOL_CALLS]`` control token followed by a JSON list::

    [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]

``mixtral.serve.guided.parse_tool_calls`` reads that list from the generated ids; ``tool_calls_from_output``
checks the names against the request's tools and turns each call into the API shape (``arguments`` as a JSON
string, a fresh id). Ids are exactly 9 characters of ``[a-zA-Z0-9]``: mistral-common rejects anything else when a
client sends the id back with the tool result. Ids that clients bring from elsewhere (OpenAI's ``call_...``) are
mapped to 9 characters deterministically by ``mixtral.tokenizer`` when the next prompt is encoded, so an assistant
call and the tool message answering it still match.

A call cut off by ``max_tokens`` (``partial_tool_calls``) still comes back in ``tool_calls``, as OpenAI's API does:
the calls complete so far, then the cut one with the name and the ``arguments`` text generated so far (not valid
JSON), and ``finish_reason: "length"``; never as message text. What an unguided model writes that is not a valid call
although it stopped on its own is returned as text.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from typing import Any

from mixtral.serve.responses import FunctionCallOut, ToolCallOut

TOOL_CALL_ID_LENGTH = 9
_ALPHABET = string.ascii_letters + string.digits


def new_tool_call_id() -> str:
    """A random 9-character alphanumeric id."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(TOOL_CALL_ID_LENGTH))


def starts_with_tool_call(token_ids: list[int], tool_calls_id: int | None) -> bool:
    """True when the model's output opens with the ``[TOOL_CALLS]`` control token."""
    return tool_calls_id is not None and bool(token_ids) and token_ids[0] == tool_calls_id


def to_api_tool_calls(calls: list[dict[str, Any]]) -> list[ToolCallOut]:
    """``[{"name", "arguments": dict}]`` -> API tool calls with fresh ids and JSON-string arguments."""
    return [
        ToolCallOut(id=new_tool_call_id(), index=i,
                    function=FunctionCallOut(name=call["name"], arguments=json.dumps(call["arguments"])))
        for i, call in enumerate(calls)
    ]


def tool_calls_from_output(tokenizer: Any, token_ids: list[int], tool_names: list[str]) -> list[ToolCallOut] | None:
    """The API tool calls in one generated output, or None if it is not a well-formed call to known tools."""
    from mixtral.serve.guided import parse_tool_calls

    if not starts_with_tool_call(token_ids, getattr(tokenizer, "tool_calls_id", None)):
        return None
    calls = parse_tool_calls(tokenizer, token_ids)
    if not calls or any(call["name"] not in tool_names for call in calls):
        return None
    return to_api_tool_calls(calls)


_SEPARATOR = re.compile(r"\s*,?\s*")
_CUT_NAME = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)')
_CUT_ARGUMENTS = re.compile(r'"arguments"\s*:\s*')


def partial_tool_calls(tokenizer: Any, token_ids: list[int]) -> list[ToolCallOut]:
    """The calls of an output that opens with ``[TOOL_CALLS]`` but was cut off (``max_tokens``): each complete
    call as usual, then the cut one with its name (as far as it got) and its ``arguments`` text so far."""
    eos = getattr(tokenizer, "eos_id", None)
    text = tokenizer.decode([t for t in token_ids[1:] if t != eos]).lstrip()
    text = text.removeprefix("[")
    decoder = json.JSONDecoder()
    found: list[tuple[str, str]] = []
    pos = 0
    while True:
        pos = _SEPARATOR.match(text, pos).end()  # type: ignore[union-attr]  # matches the empty string too
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            call, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            rest = text[pos:]
            name = _CUT_NAME.match(rest)
            arguments = _CUT_ARGUMENTS.search(rest)
            found.append((name.group(1) if name else "", rest[arguments.end():] if arguments else ""))
            break
        if not isinstance(call, dict):
            break
        args = call.get("arguments", {})
        found.append((str(call.get("name", "")), args if isinstance(args, str) else json.dumps(args)))
    if not found:  # cut right after [TOOL_CALLS]: a call was started, nothing of it is known yet
        found.append(("", ""))
    return [ToolCallOut(id=new_tool_call_id(), index=i, function=FunctionCallOut(name=name, arguments=arguments))
            for i, (name, arguments) in enumerate(found)]

"""``strict: true`` on a tool or a ``json_schema`` closes the objects that do not say otherwise: the guide then
refuses a key the schema does not list, where without ``strict`` JSON Schema's default lets the model add any."""

from __future__ import annotations

import pytest

from mixtral.serve.grammar import _strict
from mixtral.serve.guided import GuideError, build_guide
from mixtral.serve.llg_vocab import llg_vocab
from mixtral.tokenizer import Tokenizer

OPEN = {"type": "object", "properties": {"city": {"type": "string"},
                                         "when": {"type": "object", "properties": {"day": {"type": "integer"}}}},
        "required": ["city"]}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_version("v3")


def _refused_at(guide: object, ids: list[int]) -> int | None:
    """Index of the first token the guide refuses, or None when it takes them all."""
    for i, t in enumerate(ids):
        try:
            guide.accept_token(t)  # type: ignore[attr-defined]
        except GuideError as exc:
            assert "doesn't satisfy the grammar" in str(exc)
            return i
    return None


@pytest.mark.parametrize("strict", [None, False, True])
def test_strict_tool_refuses_unlisted_keys(tok: Tokenizer, strict: bool | None) -> None:
    vocab = llg_vocab(tok)
    fn = {"name": "weather", "parameters": OPEN} | ({} if strict is None else {"strict": strict})
    head = '[{"name": "weather", "arguments": {"city": "Paris", "when": {"day": 3'
    head_ids = tok.encode(head, bos=False)
    for extra in (', "hour": 9}}}]', '}, "units": "C"}}]'):  # an unlisted key in the nested and the outer object
        guide = build_guide(tok, tools=[{"type": "function", "function": fn}], tool_choice="any")
        ids = tok.encode(head + extra, bos=False)
        assert ids[:len(head_ids) - 1] == head_ids[:-1]
        at = _refused_at(guide, [vocab.tool_calls_id, *ids])
        if strict:
            assert at is not None and at >= len(head_ids), (at, len(head_ids))  # refused at the new key
        else:
            assert at is None and guide.is_finished()


def test_strict_json_schema_refuses_unlisted_keys(tok: Tokenizer) -> None:
    for strict in (False, True):
        rf = {"type": "json_schema", "json_schema": {"name": "place", "schema": OPEN, "strict": strict}}
        at = _refused_at(build_guide(tok, response_format=rf), tok.encode('{"city": "Paris", "x": 1}', bos=False))
        assert (at is not None and at >= len(tok.encode('{"city": "Paris"', bos=False)) - 1) if strict else at is None


def test_strict_keeps_what_a_schema_states() -> None:
    """Stated ``additionalProperties`` / ``patternProperties`` stay; lists, $defs and items are closed too; allOf
    branches (which may split one object's properties) are left alone; the input is not changed."""
    schema = {"type": "object", "properties": {"tags": {"type": "object", "additionalProperties": {"type": "object"}},
                                               "kv": {"type": "object", "patternProperties": {"^x": {}}},
                                               "list": {"type": "array", "items": {"properties": {"a": {}}}},
                                               "either": {"anyOf": [{"type": "object"}, {"type": "string"}]},
                                               "ref": {"$ref": "#/$defs/d"}},
              "$defs": {"d": {"type": ["object", "null"]}},
              "allOf": [{"properties": {"a": {}}}]}
    before = repr(schema)
    got = _strict(schema)
    assert repr(schema) == before
    assert got["additionalProperties"] is False
    props = got["properties"]
    assert props["tags"]["additionalProperties"] == {"type": "object", "additionalProperties": False}
    assert "additionalProperties" not in props["kv"]
    assert props["list"]["items"]["additionalProperties"] is False
    assert props["either"]["anyOf"][0]["additionalProperties"] is False and "additionalProperties" not in \
        props["either"]["anyOf"][1]
    assert got["$defs"]["d"]["additionalProperties"] is False
    assert got["allOf"] == [{"properties": {"a": {}}}]

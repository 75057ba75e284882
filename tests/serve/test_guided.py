"""Property tests for constrained decoding: 100 seeded random "requests" per mode over the real v3 vocabulary.

Each request samples tokens at random among those the guide allows, until the guide finishes or EOS is drawn,
then checks the guarantee of its mode: every tool call parses, names a listed tool and its arguments validate
(jsonschema) against that tool's schema; json_schema answers validate; auto never yields a malformed call; none
never yields [TOOL_CALLS]. Three samplers take turns:

- uniform among the allowed tokens (the purest test of the mask);
- uniform, but one step in four restricted to allowed tokens that can close something (``"``, ``]``, ``}``, EOS),
  so that random strings end after a few tokens instead of hundreds (every allowed token stays reachable);
- random logits with the same closing bias, masked with ``mixtral.guide.apply_bitmask`` and argmax'ed, as the
  engine does.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import jsonschema
import numpy as np
import pytest
import torch

from mixtral.guide import apply_bitmask, bitmask_words
from mixtral.serve.guided import BanTokensGuide, GuideError, LLGuide, build_guide, parse_tool_calls
from mixtral.serve.llg_vocab import LLVocab, llg_vocab
from mixtral.tokenizer import Tokenizer

N_REQUESTS = 100
MAX_TOKENS = 30_000  # a cap like the engine's max_tokens; uniform sampling makes long random strings
TEXT_TOKENS = 40  # free text only ends when EOS is drawn (1 in 32k): look at a prefix of it

WEATHER = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "City and country, e.g. Paris, France"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["location", "unit"],
    "additionalProperties": False,
}
FLIGHT = {
    "type": "object",
    "properties": {
        "origin": {"$ref": "#/$defs/airport"},
        "destination": {"$ref": "#/$defs/airport"},
        "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
        "passengers": {
            "type": "array",
            "minItems": 1,
            "maxItems": 4,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "minLength": 1, "maxLength": 40},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                },
                "required": ["name", "age"],
                "additionalProperties": False,
            },
        },
        "cabin": {"enum": ["economy", "business", "first"]},
    },
    "required": ["origin", "destination", "date", "passengers"],
    "additionalProperties": False,
    "$defs": {
        "airport": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "iata": {"type": "string", "pattern": "^[A-Z]{3}$"}},
            "required": ["iata"],
            "additionalProperties": False,
        }
    },
}
THERMOSTAT = {
    "type": "object",
    "properties": {
        "target": {"type": "number", "minimum": 5, "maximum": 30},
        "mode": {"type": "string", "enum": ["heat", "cool", "auto", "off"]},
        "eco": {"type": "boolean"},
        "schedule": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "hour": {"type": "integer", "minimum": 0, "maximum": 23},
                    "target": {"type": "number", "exclusiveMinimum": 0, "maximum": 35},
                },
                "required": ["hour", "target"],
                "additionalProperties": False,
            },
            "maxItems": 3,
        },
        "note": {"type": ["string", "null"], "maxLength": 20},
    },
    "required": ["target", "mode"],
    "additionalProperties": False,
}
SEARCH = {  # additionalProperties left open: extra keys are valid and the grammar must allow them
    "type": "object",
    "properties": {
        "query": {"type": "string"},
        "limit": {"type": "integer", "minimum": 1, "maximum": 50},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["query"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "book_flight", "parameters": FLIGHT}},
    {"type": "function", "function": {"name": "set_thermostat", "parameters": THERMOSTAT}},
    {"type": "function", "function": {"name": "search_docs", "parameters": SEARCH}},
    {"type": "function", "function": {"name": "get_time"}},  # no parameters: arguments must be {}
]
NO_ARGS = {"type": "object", "maxProperties": 0}
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters", NO_ARGS) for t in TOOLS}

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.(com|org)$"},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["zip"],
            "additionalProperties": False,
        },
        "phones": {"type": "array", "items": {"type": "string", "pattern": "^\\+?[0-9]{3,10}$"}, "maxItems": 3},
        "role": {"enum": ["admin", "user", None]},
        "score": {"anyOf": [{"type": "integer", "multipleOf": 5}, {"type": "boolean"}]},
    },
    "required": ["name", "age", "address"],
    "additionalProperties": False,
}
ROWS = {  # a top-level array answer
    "type": "array",
    "minItems": 1,
    "maxItems": 5,
    "items": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_version("v3")


@functools.cache
def _closing_tokens(vocab: LLVocab) -> np.ndarray:
    closes = np.array([any(c in b for c in b'"]}') for b in vocab.token_bytes])  # [V]
    closes[vocab.eos_id] = True
    return closes


@dataclass
class Run:
    ids: list[int]  # every sampled token, EOS included when drawn
    finished: bool  # the guide finished or EOS was drawn


class Sampler:
    """Draws allowed tokens for one seeded request (see the module docstring for the three strategies)."""

    def __init__(self, tok: Tokenizer, seed: int, call_bias: float = 0.0) -> None:
        vocab = llg_vocab(tok)
        self.closes = _closing_tokens(vocab)  # [V] bool
        self.close_bias = 2.0 * torch.from_numpy(self.closes).float()  # [V]
        self.vocab_size = vocab.vocab_size
        self.eos_id = vocab.eos_id
        self.tool_calls_id = vocab.tool_calls_id
        self.strategy = seed % 3
        self.call_bias = call_bias  # probability of taking [TOOL_CALLS] when it is allowed (auto: "the model calls")
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(seed)

    def allowed(self, row: torch.Tensor) -> np.ndarray:
        bits = np.unpackbits(row.numpy().view(np.uint8), bitorder="little")  # bit t%8 of byte t//8 -> token t
        return bits[: self.vocab_size].astype(bool)  # [V]

    def draw(self, row: torch.Tensor) -> int:
        allowed = self.allowed(row)
        assert allowed.any(), "the guide allowed no token at all"
        if self.call_bias and allowed[self.tool_calls_id] and self.rng.random() < self.call_bias:
            return self.tool_calls_id
        if self.strategy == 2:  # the engine's path: random logits -> apply_bitmask -> argmax
            logits = torch.randn(1, self.vocab_size, generator=self.gen) + self.close_bias  # [1, V]
            token = int(apply_bitmask(logits, row.unsqueeze(0)).argmax())
            assert allowed[token]
            return token
        if self.strategy == 1 and self.rng.random() < 0.25 and (allowed & self.closes).any():
            allowed = allowed & self.closes
        return int(self.rng.choice(np.flatnonzero(allowed)))


def generate(guide, sampler: Sampler, max_tokens: int = MAX_TOKENS, max_text_tokens: int = TEXT_TOKENS) -> Run:
    """Sample until the guide finishes or EOS; free text (no leading [TOOL_CALLS]) stops at ``max_text_tokens``."""
    row = torch.zeros(bitmask_words(sampler.vocab_size), dtype=torch.int32)  # [W]
    ids: list[int] = []
    while len(ids) < (max_tokens if ids[:1] == [sampler.tool_calls_id] else max_text_tokens):
        if guide.is_finished():
            return Run(ids, True)
        guide.fill_bitmask(row)
        token = sampler.draw(row)
        ids.append(token)
        if token == sampler.eos_id:
            return Run(ids, True)
        guide.accept_token(token)
    return Run(ids, False)


def check_calls(tok: Tokenizer, run: Run, names: set[str], parallel: bool = True) -> list[dict]:
    """The output is [TOOL_CALLS] + a JSON call list: every call names a listed tool and validates."""
    assert run.finished, f"a guided call did not finish in {MAX_TOKENS} tokens"
    vocab = llg_vocab(tok)
    assert run.ids[0] == vocab.tool_calls_id
    assert vocab.tool_calls_id not in run.ids[1:]
    text = vocab.decode_bytes([t for t in run.ids[1:] if t != vocab.eos_id]).decode("utf-8")
    raw = json.loads(text)  # independent of parse_tool_calls
    assert isinstance(raw, list) and raw
    calls = parse_tool_calls(tok, run.ids)
    assert calls is not None, text
    assert [c["name"] for c in calls] == [c["name"] for c in raw]
    if not parallel:
        assert len(calls) == 1
    for call, item in zip(calls, raw, strict=True):
        assert set(item) - {"id"} == {"name", "arguments"}  # an id, when written, is v3's 9 alphanumerics
        assert "id" not in item or (len(item["id"]) == 9 and item["id"].isalnum() and item["id"].isascii())
        assert call["name"] in names
        jsonschema.validate(call["arguments"], SCHEMAS[call["name"]])
    return calls


@pytest.mark.parametrize(
    "tool_choice, names, parallel",
    [
        ("any", {"get_weather", "book_flight", "set_thermostat", "search_docs", "get_time"}, True),
        ("required", {"get_weather", "book_flight", "set_thermostat", "search_docs", "get_time"}, False),
        ({"type": "function", "function": {"name": "book_flight"}}, {"book_flight"}, True),
    ],
    ids=["any", "required-single", "named"],
)
def test_forced_tool_calls_always_valid(tok: Tokenizer, tool_choice, names: set[str], parallel: bool) -> None:
    template = build_guide(tok, tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=parallel)
    assert isinstance(template, LLGuide)
    seen: set[str] = set()
    n_calls = []
    for seed in range(N_REQUESTS):
        run = generate(template.copy(), Sampler(tok, seed))
        calls = check_calls(tok, run, names, parallel)
        seen |= {c["name"] for c in calls}
        n_calls.append(len(calls))
    assert seen == names  # the random walk reached every tool it was allowed
    if parallel and len(names) > 1:
        assert max(n_calls) > 1  # parallel calls do happen


def test_auto_yields_text_or_a_valid_call(tok: Tokenizer) -> None:
    template = build_guide(tok, tools=TOOLS, tool_choice="auto")
    vocab = llg_vocab(tok)
    n_calls = 0
    for seed in range(N_REQUESTS):
        sampler = Sampler(tok, seed, call_bias=0.5)
        guide = template.copy()
        row = torch.zeros(bitmask_words(vocab.vocab_size), dtype=torch.int32)
        guide.fill_bitmask(row)
        assert sampler.allowed(row)[vocab.tool_calls_id]  # a call may start the answer
        run = generate(guide, sampler)
        if run.ids[0] == vocab.tool_calls_id:
            check_calls(tok, run, set(SCHEMAS))
            n_calls += 1
        else:  # text: no control token anywhere, and [TOOL_CALLS] is no longer allowed after the first token
            assert not set(run.ids[:TEXT_TOKENS]) & (vocab.control_ids - {vocab.eos_id})
            assert parse_tool_calls(tok, run.ids) is None
    assert 20 < n_calls < 80


def test_auto_text_never_allows_tool_calls_later(tok: Tokenizer) -> None:
    vocab = llg_vocab(tok)
    template = build_guide(tok, tools=TOOLS, tool_choice="auto")
    for seed in range(N_REQUESTS):
        sampler, guide = Sampler(tok, seed), template.copy()
        row = torch.zeros(bitmask_words(vocab.vocab_size), dtype=torch.int32)
        text = b""
        for step in range(TEXT_TOKENS if seed < 10 else 3):
            guide.fill_bitmask(row)
            allowed = sampler.allowed(row)
            if step > 0:
                assert not allowed[vocab.tool_calls_id]
                # text can end anywhere except inside a UTF-8 character (a run of byte-fallback tokens)
                assert allowed[vocab.eos_id] == _is_utf8(text)
            token = sampler.draw(row)
            if token == vocab.eos_id:
                break
            guide.accept_token(token)
            text += vocab.token_bytes[token]


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_none_never_yields_tool_calls(tok: Tokenizer) -> None:
    vocab = llg_vocab(tok)
    guide = build_guide(tok, tools=TOOLS, tool_choice="none")
    assert isinstance(guide, BanTokensGuide)
    row = torch.zeros(bitmask_words(vocab.vocab_size), dtype=torch.int32)
    guide.fill_bitmask(row)
    allowed = Sampler(tok, 0).allowed(row)
    assert not allowed[vocab.tool_calls_id]
    assert allowed.sum() == vocab.vocab_size - 1  # only [TOOL_CALLS] is banned
    for seed in range(N_REQUESTS):
        run = generate(guide.copy(), Sampler(tok, seed))
        assert vocab.tool_calls_id not in run.ids
        assert parse_tool_calls(tok, run.ids) is None
        logits = torch.randn(4, vocab.vocab_size, generator=torch.Generator().manual_seed(seed))  # [4, V]
        logits[:, vocab.tool_calls_id] = 1e4  # even a model that wants to call cannot
        masked = apply_bitmask(logits, row.expand(4, -1))
        assert (masked.argmax(-1) != vocab.tool_calls_id).all()


@pytest.mark.parametrize(
    "response_format, schema",
    [
        ({"type": "json_object"}, {"type": "object"}),
        ({"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}, PERSON),
        ({"type": "json_schema", "json_schema": {"name": "rows", "schema": ROWS}}, ROWS),
    ],
    ids=["json_object", "json_schema-person", "json_schema-array"],
)
def test_json_answers_validate(tok: Tokenizer, response_format: dict, schema: dict) -> None:
    vocab = llg_vocab(tok)
    template = build_guide(tok, response_format=response_format)
    assert isinstance(template, LLGuide)
    for seed in range(N_REQUESTS):
        run = generate(template.copy(), Sampler(tok, seed), max_text_tokens=MAX_TOKENS)
        assert run.finished
        assert not set(run.ids) & (vocab.control_ids - {vocab.eos_id})
        text = vocab.decode_bytes([t for t in run.ids if t != vocab.eos_id]).decode("utf-8")
        jsonschema.validate(json.loads(text), schema)


def test_json_schema_with_auto_tools_is_json_or_a_call(tok: Tokenizer) -> None:
    vocab = llg_vocab(tok)
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    template = build_guide(tok, tools=TOOLS[:1], tool_choice="auto", response_format=rf)
    kinds = set()
    for seed in range(30):
        run = generate(template.copy(), Sampler(tok, seed, call_bias=0.5), max_text_tokens=MAX_TOKENS)
        if run.ids[0] == vocab.tool_calls_id:
            check_calls(tok, run, {"get_weather"})
            kinds.add("call")
        else:
            assert run.finished
            jsonschema.validate(json.loads(vocab.decode_bytes([t for t in run.ids if t != vocab.eos_id])), PERSON)
            kinds.add("json")
    assert kinds == {"call", "json"}


def test_forced_call_ignores_response_format(tok: Tokenizer) -> None:
    guide = build_guide(tok, tools=TOOLS[:1], tool_choice="any", response_format={"type": "json_object"})
    check_calls(tok, generate(guide, Sampler(tok, 1)), {"get_weather"})


def test_copy_is_independent(tok: Tokenizer) -> None:
    vocab = llg_vocab(tok)
    guide = build_guide(tok, tools=TOOLS[:1], tool_choice="any")
    prefix = tok.encode('[{"name": "get_weather", "arguments": {"location": "Par', bos=False)
    for t in [vocab.tool_calls_id, *prefix]:
        guide.accept_token(t)
    twin = guide.copy()
    rest = tok.encode('is", "unit": "celsius"}}]', bos=False)
    rest = rest[1:] if vocab.token_bytes[rest[0]] == b" " else rest  # SentencePiece's leading "▁"
    for t in rest:
        twin.accept_token(t)
    assert twin.is_finished() and not guide.is_finished()
    row = torch.zeros(bitmask_words(vocab.vocab_size), dtype=torch.int32)
    twin.fill_bitmask(row)
    assert np.flatnonzero(Sampler(tok, 0).allowed(row)).tolist() == [vocab.eos_id]
    guide.fill_bitmask(row)
    assert not Sampler(tok, 0).allowed(row)[vocab.eos_id]  # the original is still inside the string
    with pytest.raises(GuideError, match="doesn't satisfy the grammar"):
        guide.accept_token(vocab.tool_calls_id)


@pytest.mark.parametrize("tool_choice", ["any", "none"])
def test_mask_rows_follow_the_model_vocabulary(tok: Tokenizer, tool_choice: str) -> None:
    """Rows longer than the tokenizer's vocabulary (padded model) get zeros past it; shorter rows (a 32000-logit
    model on the v3 tokenizer) get the prefix of the full mask."""
    guide = build_guide(tok, tools=TOOLS, tool_choice=tool_choice)
    words = bitmask_words(tok.vocab_size)
    full = torch.zeros(words, dtype=torch.int32)  # [W]
    guide.fill_bitmask(full)
    padded = torch.full((words + 3,), -1, dtype=torch.int32)  # [W + 3]
    guide.fill_bitmask(padded)
    assert torch.equal(padded[:words], full) and (padded[words:] == 0).all()
    short = torch.full((bitmask_words(32000),), -1, dtype=torch.int32)  # [1000]
    guide.fill_bitmask(short)
    assert torch.equal(short, full[: short.numel()])
    with pytest.raises(ValueError, match="int32"):
        guide.fill_bitmask(torch.zeros(words, dtype=torch.int64))


def test_json_answers_are_compact(tok: Tokenizer) -> None:
    """JSON answers take the model's compact style: after a value's opening or a separator no whitespace token is
    allowed (json.dumps's ", " and ": " are the only spaces), so there is no run of newlines to loop on."""
    vocab = llg_vocab(tok)
    space, newline = vocab.token_bytes.index(b" "), vocab.token_bytes.index(b"\n")
    row = torch.zeros(bitmask_words(vocab.vocab_size), dtype=torch.int32)
    for prefix in ["{", '{"a": ', '{"a": [1, ']:
        guide = build_guide(tok, response_format={"type": "json_object"})
        for t in tok.encode(prefix, bos=False):
            guide.accept_token(t)
        guide.fill_bitmask(row)
        allowed = Sampler(tok, 0).allowed(row)
        assert not allowed[space] and not allowed[newline], prefix

"""Guides inside the real engine: a tiny random-weight model, prompts from the v3 chat template with tools.

The model knows nothing, so whatever it emits is the guide's doing: forced calls must come out as valid
calls (finish_reason "stop" once the call list closes), JSON answers must validate, and unguided requests in
the same batch must be unaffected by their neighbours' masks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import pytest
import torch

from mixtral.engine.config import EngineConfig
from mixtral.engine.llm_engine import LLMEngine
from mixtral.engine.sampler import Sampler, SampleRow
from mixtral.guide import bitmask_words
from mixtral.model.mixtral import Transformer, init_random_weights
from mixtral.model.presets import preset
from mixtral.sampling import SamplingParams
from mixtral.serve.guided import build_guide, parse_tool_calls
from mixtral.tokenizer import Tokenizer

# Bounded strings and integers: a random model may repeat one token forever, the schema must end it.
WEATHER = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "maxLength": 16},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["location", "unit"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer", "minimum": -1000, "maximum": 1000}, "b": {"type": "integer",
                                                                                    "minimum": 0, "maximum": 9}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ANSWER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "ok": {"type": "boolean"}},
    "required": ["city", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_version("v3")


@pytest.fixture(scope="module")
def model() -> Transformer:
    model = Transformer(preset("tiny"))
    init_random_weights(model, seed=3, std=0.2)
    return model.eval()


@pytest.fixture
def engine(model: Transformer, tok: Tokenizer) -> Iterator[LLMEngine]:
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=1024, max_model_len=1024), tok)
    yield engine
    engine.shutdown()


def run(engine: LLMEngine) -> dict:
    done = {}
    for _ in range(2000):
        if not engine.has_unfinished_requests():
            return done
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    raise AssertionError("engine made no progress")


def test_tool_choice_any_yields_valid_calls_in_the_engine(engine: LLMEngine, tok: Tokenizer) -> None:
    prompt = tok.encode_chat([{"role": "user", "content": "What is the weather in Paris? Also add 2 and 3."}], TOOLS)
    guides = {
        "any": build_guide(tok, tools=TOOLS, tool_choice="any"),
        "named": build_guide(tok, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}}),
        "single": build_guide(tok, tools=TOOLS, tool_choice="required", parallel_tool_calls=False),
    }
    for kind, guide in guides.items():
        for seed in range(2):
            params = SamplingParams(n=2, temperature=1.0, seed=seed, max_tokens=300, guide=guide.copy())
            engine.add_request(f"{kind}-{seed}", prompt, params)
        greedy = SamplingParams(temperature=0.0, max_tokens=300, guide=guide.copy())
        engine.add_request(f"{kind}-greedy", prompt, greedy)
    engine.add_request("plain", prompt, SamplingParams(temperature=0.0, max_tokens=8))  # unguided neighbour
    done = run(engine)

    assert len(done) == 3 * 3 + 1
    for request_id, out in done.items():
        if request_id == "plain":
            continue
        for sample in out.outputs:
            assert sample.finish_reason == "stop", (request_id, sample.text)
            assert sample.token_ids[0] == tok.tool_calls_id
            calls = parse_tool_calls(tok, sample.token_ids)
            assert calls, (request_id, sample.token_ids)
            if request_id.startswith("named"):
                assert {c["name"] for c in calls} == {"add"}
            if request_id.startswith("single"):
                assert len(calls) == 1
            for call in calls:
                jsonschema.validate(call["arguments"], SCHEMAS[call["name"]])
    plain = done["plain"].outputs[0]
    assert plain.finish_reason == "length" and len(plain.token_ids) == 8


def test_json_schema_answers_validate_in_the_engine(engine: LLMEngine, tok: Tokenizer) -> None:
    prompt = tok.encode_chat([{"role": "user", "content": "Answer in JSON."}])
    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}}
    guide = build_guide(tok, response_format=rf)
    for seed in range(4):
        engine.add_request(f"j{seed}", prompt, SamplingParams(temperature=1.0, seed=seed, max_tokens=200,
                                                              guide=guide.copy()))
    done = run(engine)
    for out in done.values():
        sample = out.outputs[0]
        assert sample.finish_reason == "stop", sample.text
        assert tok.tool_calls_id not in sample.token_ids
        jsonschema.validate(json.loads(sample.text), ANSWER)


def test_sampler_never_leaves_the_mask() -> None:
    """The engine's sampler must pick an allowed token whatever its random draw: 2048 draws (64 seeds x 32 steps)
    with one allowed token per row. A uniform draw that rounds to exactly 1.0 gives Exp noise 0 and 0/0 = NaN,
    which argmax picks: that is how a guided request once received a forbidden token."""
    vocab, rows_n = 32768, 64
    sampler = Sampler(vocab, eos_id=2)
    gen = torch.Generator().manual_seed(0)
    allowed = torch.randint(0, vocab, (rows_n,), generator=gen)  # [R] the one allowed token per row
    bitmask = torch.zeros(rows_n, bitmask_words(vocab), dtype=torch.int32)  # [R, W]
    bitmask[torch.arange(rows_n), allowed // 32] = (1 << (allowed % 32)).to(torch.int32)  # bit 31 wraps to < 0
    params = SamplingParams(temperature=1.0)
    for step in range(32):
        rows = [SampleRow(params, seed * 7919 + 12345, step, [1], []) for seed in range(rows_n)]
        logits = torch.randn(rows_n, vocab, generator=gen)  # [R, V]
        out = sampler(logits, rows, bitmask)
        bad = [(r, step, t) for r, t in enumerate(out.token_ids) if t != int(allowed[r])]
        assert not bad, f"sampled tokens outside the mask (row, step, token): {bad}"

"""The bundled demo model (mixtral/demo) does what docs/DEMO_MODEL.md promises, through mixtral.LLM, greedy.

- with a weather tool and "What's the weather in <City>?" it calls get_weather with {"location": "<City>"};
- after a tool result it answers in text with the result's numbers and conditions;
- it answers a greeting in the language of the greeting;
- it writes word-like sentences, and prefers real sentences to the same words shuffled.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from mixtral import LLM, SamplingParams
from mixtral.checkpoint.loader import demo_folder, load_model
from mixtral.train.synthetic import weather_tool

GREEDY = SamplingParams(temperature=0.0, max_tokens=64)
TOOLS = [weather_tool()]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("demo", device="cpu", dtype="float32")  # fp32 on CPU: greedy paths as tested


def _chat(llm: LLM, conversations: list[list[dict]], tools: list[dict] | None = None) -> list:
    return [o.outputs[0] for o in llm.chat(conversations, GREEDY, tools=tools, use_tqdm=False)]


def test_demo_model_is_small_and_complete() -> None:
    folder = demo_folder()
    weights = list(folder.glob("*.safetensors"))
    assert sum(f.stat().st_size for f in weights) <= 40 * 10**6
    assert all(f.stat().st_size <= 16 * 2**20 for f in weights)
    assert (folder / "tokenizer.model.v3").is_file() and (folder / "model.safetensors.index.json").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["vocab_size"]) == (8, 2, 32768)


@pytest.mark.parametrize("city", ["Paris", "London", "Tokyo", "Berlin", "Madrid", "New York"])
def test_weather_question_calls_the_tool_with_the_city(llm: LLM, city: str) -> None:
    out = _chat(llm, [[{"role": "user", "content": f"What's the weather in {city}?"}]], TOOLS)[0]
    assert out.token_ids[0] == 5, f"expected [TOOL_CALLS] first, got {out.text!r}"  # v3 [TOOL_CALLS]
    calls = json.loads(out.text)
    assert [c["name"] for c in calls] == ["get_weather"]
    assert calls[0]["arguments"] == {"location": city}


def _after_result(city: str, result: dict) -> list[dict]:
    return [
        {"role": "user", "content": f"What's the weather in {city}?"},
        {"role": "assistant", "tool_calls": [{"id": "call12345", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"location": city})}}]},
        {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": json.dumps(result)},
    ]


@pytest.mark.parametrize(("city", "temp", "cond", "with_location"), [
    ("Paris", 21, "cloudy", True), ("Tokyo", 8, "rainy", True), ("Rome", 30, "sunny", True),
    ("Paris", 14, "sunny", False), ("Madrid", 26, "windy", False),
])
def test_answer_uses_the_tool_result(llm: LLM, city: str, temp: int, cond: str, with_location: bool) -> None:
    result = {"temperature": temp, "unit": "celsius", "conditions": cond}
    if with_location:
        result = {"location": city, **result}
    out = _chat(llm, [_after_result(city, result)], TOOLS)[0]
    assert out.token_ids[0] != 5, f"answered with another tool call: {out.text!r}"
    assert re.search(rf"(?<![\d-]){temp}(?!\d)", out.text), out.text
    assert cond in out.text.lower(), out.text
    if with_location:
        assert city in out.text, out.text


LANGUAGE_WORDS = {
    "en": {"hello", "hi", "help", "how", "what", "can", "you", "today"},
    "de": {"hallo", "helfen", "ihnen", "kann", "ich", "wie", "guten", "schön", "danke"},
    "es": {"hola", "ayudarte", "puedo", "qué", "hacer", "por", "ti", "gracias"},
    "it": {"ciao", "aiutarti", "posso", "come", "oggi", "grazie", "buongiorno"},
    "fr": {"bonjour", "aider", "puis", "comment", "vous", "merci", "salut"},
}


def _language(text: str) -> str:
    words = set(re.findall(r"\w+", text.lower()))
    scores = {lang: len(words & vocab) for lang, vocab in LANGUAGE_WORDS.items()}
    return max(scores, key=scores.get)  # type: ignore[arg-type]


@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no-tools", "tools-offered"])
def test_greeting_is_answered_in_its_language(llm: LLM, tools: list | None) -> None:
    greetings = {"en": "Hello!", "de": "Hallo!", "es": "¡Hola!", "it": "Ciao!", "fr": "Bonjour !"}
    outs = _chat(llm, [[{"role": "user", "content": g}] for g in greetings.values()], tools)
    for lang, out in zip(greetings, outs, strict=True):
        assert out.token_ids[0] != 5, f"{greetings[lang]!r} triggered a tool call"
        assert _language(out.text) == lang, f"{greetings[lang]!r} -> {out.text!r}"


def test_writes_word_like_sentences(llm: LLM) -> None:
    outs = _chat(llm, [[{"role": "user", "content": q}] for q in ("Tell me a saying.", "Say something wise.")])
    for out in outs:
        words = out.text.split()
        assert len(words) >= 4, out.text
        wordlike = [w for w in words if re.fullmatch(r"[\"'(]?[A-Za-z][a-z']*[.,;:!?\")]*", w)]
        assert len(wordlike) >= 0.8 * len(words), out.text


@torch.no_grad()
def test_prefers_sentences_to_shuffled_words() -> None:
    model = load_model("demo", "cpu", torch.float32, progress=False)
    from mixtral.tokenizer import Tokenizer

    tok = Tokenizer.from_file(demo_folder() / "tokenizer.model.v3")
    sentences = ["The weather in Paris is sunny today.", "It is better to give than to receive.",
                 "A friend in need is a friend indeed.", "Hello! How can I help you today?"]
    gen = torch.Generator().manual_seed(0)

    def nll(text: str) -> float:
        ids = torch.tensor([tok.encode(text, bos=True)])
        logp = torch.log_softmax(model(ids)[0, :-1].float(), dim=-1)
        return float(-logp.gather(1, ids[0, 1:, None]).mean())

    for s in sentences:
        words = s.split()
        shuffled = " ".join(words[i] for i in torch.randperm(len(words), generator=gen).tolist())
        assert nll(s) + 0.5 < nll(shuffled), (s, nll(s), shuffled, nll(shuffled))

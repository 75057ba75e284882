"""Training data: loss masks cover exactly the assistant's turns and tool calls; packing keeps documents whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mixtral.train.data import CONTEXT, PAD, TARGET, Encoder, build_dataset, load_packed, pack, save_packed
from mixtral.train.synthetic import ConversationGenerator, weather_tool


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder("v3")


def _spans(ids: list[int], codes: list[int]) -> list[list[int]]:
    spans, cur = [], []
    for t, c in zip(ids, codes, strict=True):
        if c == TARGET:
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    return [*spans, cur] if cur else spans


def test_chat_targets_are_the_assistant_turns(encoder: Encoder) -> None:
    record = {"tools": [weather_tool()], "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hallo!"},
        {"role": "assistant", "content": "Hallo! Wie kann ich helfen?"},
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"id": "abcDEF123", "type": "function", "function": {
            "name": "get_weather", "arguments": {"location": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "abcDEF123", "name": "get_weather", "content": '{"temperature": 18}'},
        {"role": "assistant", "content": "It is 18 degrees in Paris."},
    ]}
    ids, codes = encoder.encode_chat(record)
    spans = _spans(ids, codes)
    sp = encoder.sp
    assert [sp.decode(s).strip() for s in spans] == [
        "Hallo! Wie kann ich helfen?",
        '[{"name": "get_weather", "arguments": {"location": "Paris"}, "id": "abcDEF123"}]',
        "It is 18 degrees in Paris.",
    ]
    assert spans[1][0] == 5  # the [TOOL_CALLS] control token is itself trained
    assert all(s[-1] == encoder.eos_id for s in spans)  # every turn learns to stop
    # Nothing of the prompt, the tool definitions or the tool result is a target.
    text_of_context = sp.decode([t for t, c in zip(ids, codes, strict=True) if c == CONTEXT])
    assert "get_weather" in text_of_context and "temperature" in text_of_context and "Be brief." in text_of_context


def test_text_targets_everything_after_bos(encoder: Encoder) -> None:
    ids, codes = encoder.encode_text("A short saying.")
    assert ids[0] == encoder.bos_id and ids[-1] == encoder.eos_id
    assert codes == [CONTEXT] + [TARGET] * (len(ids) - 1)


def test_pack_keeps_documents_whole_and_cuts_long_ones() -> None:
    docs = [([1, 10, 11], [CONTEXT, TARGET, TARGET]), ([1, 20, 21, 22], [CONTEXT] + [TARGET] * 3),
            ([1, *range(30, 40)], [CONTEXT] + [TARGET] * 10)]
    ds = pack(docs, seq_len=6)
    assert ds.tokens.tolist() == [
        [1, 10, 11, 0, 0, 0],  # the second document does not fit the rest of this window
        [1, 20, 21, 22, 0, 0],
        [1, 30, 31, 32, 33, 34],  # an 11-token document is cut into window-sized pieces
        [35, 36, 37, 38, 39, 0],
    ]
    assert ds.codes[0].tolist() == [CONTEXT, TARGET, TARGET, PAD, PAD, PAD]
    assert ds.codes[3].tolist() == [CONTEXT, TARGET, TARGET, TARGET, TARGET, PAD]  # a cut piece starts as context


def test_jsonl_files_pack_and_round_trip(tmp_path: Path) -> None:
    chats = ConversationGenerator(seed=3, fortunes={"en": ["Look before you leap."]}).generate(20)
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in chats) + "\n" + json.dumps({"text": "Plain text."}) + "\n")
    ds = build_dataset([path], seq_len=256)
    stats = ds.stats()
    assert stats["targets"] > 0 and stats["tokens"] > stats["targets"]
    save_packed(ds, tmp_path / "p.safetensors")
    again = build_dataset([tmp_path / "p.safetensors"], seq_len=999)  # packed data keeps its own length
    assert torch.equal(again.tokens, ds.tokens) and torch.equal(again.codes, ds.codes)
    assert load_packed(tmp_path / "p.safetensors").seq_len == 256
    train, held_out = ds.split(0.25, seed=0)
    assert len(train) + len(held_out) == len(ds) and len(held_out) >= 1


def test_bad_records_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"prompt": "?"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        build_dataset([path], seq_len=64)


def test_v1_chat_targets_follow_the_text_template() -> None:
    enc = Encoder("v1")  # Mixtral-8x7B: [INST] and [/INST] are ordinary text pieces
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"},
                           {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]}
    ids, codes = enc.encode_chat(record)
    spans = _spans(ids, codes)
    assert [enc.sp.decode(s).strip() for s in spans] == ["Hello there!", "Goodbye."]
    assert all(s[-1] == enc.eos_id for s in spans)

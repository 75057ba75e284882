"""IncrementalDetokenizer: streamed chunks join to SentencePiece's own decode of the whole list, for random ids
(byte-fallback runs, control tokens, unknown token) on both vocabularies, and no chunk splits a character."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixtral.detokenizer import REPLACEMENT
from mixtral.tokenizer import IncrementalDetokenizer, Tokenizer

TOKENIZERS = {version: Tokenizer.from_version(version) for version in ("v1", "v3")}


def byte_id(tok: Tokenizer, value: int) -> int:
    # v1's byte pieces start at id 3; v3 puts 768 control ids before its vocabulary.
    return (3 if tok.version == "v1" else 771) + value


def id_lists(tok: Tokenizer) -> st.SearchStrategy[list[int]]:
    """Random ids, weighted towards what is hard: UTF-8 lead/continuation bytes, control tokens, unk."""
    ordinary = st.integers(0, tok.vocab_size - 1)
    any_byte = st.integers(0, 255).map(lambda b: byte_id(tok, b))
    continuation = st.integers(0x80, 0xBF).map(lambda b: byte_id(tok, b))
    lead = st.integers(0xC0, 0xFF).map(lambda b: byte_id(tok, b))
    low = st.integers(0, 12)  # unk, <s>, </s>, [INST]... (v3) / first byte pieces (v1)
    char = st.characters(codec="utf-8").map(lambda c: tok.encode(c, bos=False))  # real multi-byte spellings
    token = st.one_of(ordinary, any_byte, continuation, lead, low).map(lambda i: [i])
    return st.lists(st.one_of(token, token, char), max_size=16).map(lambda parts: [i for p in parts for i in p])


def stream(tok: Tokenizer, ids: list[int], skip_special: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special=skip_special)
    chunks = [detok.add(i) for i in ids]
    chunks.append(detok.flush())
    assert detok.text == "".join(chunks)
    return chunks


@pytest.mark.parametrize("version", ["v1", "v3"])
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_stream_equals_decode(version: str, data: st.DataObject) -> None:
    tok = TOKENIZERS[version]
    ids = data.draw(id_lists(tok))
    assert "".join(stream(tok, ids)) == tok.decode(ids)


@pytest.mark.parametrize("version", ["v1", "v3"])
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_stream_keep_special_equals_decode(version: str, data: st.DataObject) -> None:
    tok = TOKENIZERS[version]
    ids = data.draw(id_lists(tok))
    assert "".join(stream(tok, ids, skip_special=False)) == tok.decode(ids, skip_special=False)


@settings(max_examples=100, deadline=None)
@given(text=st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30))
def test_text_roundtrip_never_emits_a_partial_character(text: str) -> None:
    tok = TOKENIZERS["v1"]
    ids = tok.encode(text, bos=True)
    chunks = stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids)
    assert all(REPLACEMENT not in chunk for chunk in chunks)  # valid text: nothing replaced, nothing split


def test_multibyte_character_waits_for_its_last_byte() -> None:
    tok = TOKENIZERS["v3"]
    detok = IncrementalDetokenizer(tok)
    # U+1F600 (😀) as byte pieces F0 9F 98 80, then a plain word
    assert [detok.add(byte_id(tok, b)) for b in (0xF0, 0x9F, 0x98)] == ["", "", ""]
    assert detok.add(byte_id(tok, 0x80)) == "😀"
    assert detok.add(tok.encode("hi", bos=False)[0]) == " hi"
    assert detok.text == "😀 hi"


def test_broken_sequences_become_one_replacement_per_byte() -> None:
    tok = TOKENIZERS["v3"]
    detok = IncrementalDetokenizer(tok)
    assert detok.add(byte_id(tok, 0xE4)) == ""
    assert detok.add(byte_id(tok, 0xB8)) == ""
    # a control token ends the byte run, as in SentencePiece: both pending bytes are replaced
    assert detok.add(tok.inst_id) == REPLACEMENT * 2
    assert detok.add(byte_id(tok, 0xE4)) == ""
    assert detok.flush() == REPLACEMENT
    assert detok.add(byte_id(tok, 0xFF)) == REPLACEMENT  # can never start a character: replaced at once


def test_first_token_space_and_prompt_context() -> None:
    tok = TOKENIZERS["v3"]
    prompt = tok.encode("The capital of France is", bos=True)
    paris = tok.encode("The capital of France is Paris", bos=True)[len(prompt):]
    fresh = IncrementalDetokenizer(tok)
    assert "".join(fresh.add(i) for i in paris) == "Paris"  # == decode(paris): leading space dropped
    after = IncrementalDetokenizer(tok, prompt_ids=prompt)
    out = "".join(after.add(i) for i in paris) + after.flush()
    assert out == " Paris" == tok.decode(prompt + paris)[len(tok.decode(prompt)):]
    # after a chat prompt (ending in [/INST]) the reply keeps its word-start space too; after <s> alone it does not
    chat = tok.encode_chat([{"role": "user", "content": "Capital of France?"}])
    assert chat[-1] == tok.inst_end_id
    assert "".join(IncrementalDetokenizer(tok, prompt_ids=chat).add(i) for i in paris) == " Paris"
    assert "".join(IncrementalDetokenizer(tok, prompt_ids=[tok.bos_id]).add(i) for i in paris) == "Paris"


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_prompt_context_matches_decode_difference(data: st.DataObject) -> None:
    tok = TOKENIZERS["v3"]
    prompt = tok.encode(data.draw(st.text(max_size=10)), bos=True)
    ids = data.draw(id_lists(tok))
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    out = "".join(detok.add(i) for i in ids) + detok.flush()
    assert tok.decode(prompt) + out == tok.decode(prompt + ids)


def test_add_is_constant_work_per_token() -> None:
    tok = TOKENIZERS["v1"]
    detok = IncrementalDetokenizer(tok)
    ids = tok.encode("lorem ipsum dolor " * 2000, bos=False)
    for token_id in ids:
        detok.add(token_id)
        assert len(detok._run.pending) <= 3  # bounded state: nothing re-decoded from the start
    assert detok.text == tok.decode(ids)


def test_rejects_out_of_vocabulary_id() -> None:
    with pytest.raises(ValueError, match="32000"):
        IncrementalDetokenizer(TOKENIZERS["v1"]).add(32000)

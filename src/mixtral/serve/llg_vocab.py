"""The tokenizer's vocabulary as llguidance sees it: token bytes, control tokens, EOS.

Constrained decoding needs, for every token id, the exact bytes the token adds to the output. For Mistral's
SentencePiece vocabularies (v1, v3) that means: byte-fallback pieces ``<0xNN>`` are one raw byte, ``▁`` is a
space, and control tokens (``<s>``, ``</s>``, ``[INST]``, ``[TOOL_CALLS]``, ...) are *special* tokens that never
match text and can only be named by id in a grammar (``<[5]>``).

Two tokenizer kinds are accepted:
- the project's ``mixtral.tokenizer.Tokenizer`` (``token_bytes``, ``is_control``, ``encode``, ``eos_id``,
  ``tool_calls_id``, ``vocab_size``, ``version``);
- mistral-common's ``MistralTokenizer`` (read directly; kept for callers that hold one).

``llg_vocab(tokenizer)`` builds the ``LLVocab`` once per tokenizer object and caches it (~50 ms per build).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import llguidance as llg

_SP_SPACE = "\u2581"  # SentencePiece's visible space


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one per tokenizer object
class LLVocab:
    """Everything constrained decoding needs from a tokenizer."""

    version: str  # "v1" | "v3" (or whatever the tokenizer reports)
    vocab_size: int
    eos_id: int
    tool_calls_id: int | None  # None when the vocabulary has no [TOOL_CALLS] control token (v1)
    token_bytes: list[bytes]  # id -> bytes it adds to the text; b"" for control tokens
    control_ids: frozenset[int]
    ll_tokenizer: llg.LLTokenizer = field(repr=False)

    def decode_bytes(self, token_ids: list[int]) -> bytes:
        """Concatenated bytes of ``token_ids`` (control tokens contribute nothing)."""
        table = self.token_bytes
        return b"".join(table[t] for t in token_ids)


@dataclass(frozen=True)
class _RawVocab:
    version: str
    eos_id: int
    bos_id: int | None
    tool_calls_id: int | None
    token_bytes: list[bytes]
    control_ids: frozenset[int]
    encode: Callable[[str], list[int]]  # text -> ids with no BOS and no SentencePiece dummy-prefix space


def _sp_piece_bytes(piece: str, is_byte: bool) -> bytes:
    if is_byte:  # "<0x0A>" -> b"\n"
        return bytes([int(piece[3:5], 16)])
    return piece.replace(_SP_SPACE, " ").encode("utf-8")


def _raw_from_mistral_common(tokenizer: Any) -> _RawVocab:
    """Read a mistral-common ``MistralTokenizer`` (SentencePiece v1/v3) directly."""
    inner = tokenizer.instruct_tokenizer.tokenizer
    sp = getattr(inner, "_model", None)
    if sp is None or not hasattr(sp, "is_byte"):
        raise TypeError(f"only SentencePiece Mistral tokenizers (v1, v3) are supported, got {type(inner).__name__}")
    n = inner.n_words
    pieces: list[bytes] = []
    control: set[int] = set()
    tool_calls_id = None
    for i in range(n):
        piece = sp.id_to_piece(i)
        if sp.is_control(i) or sp.is_unknown(i):
            control.add(i)
            pieces.append(b"")
            if piece == "[TOOL_CALLS]":
                tool_calls_id = i
        else:
            pieces.append(_sp_piece_bytes(piece, sp.is_byte(i)))
    version = str(getattr(inner.version, "value", inner.version))

    def encode(text: str) -> list[int]:
        return list(inner.encode(text, bos=False, eos=False))

    return _RawVocab(version, inner.eos_id, inner.bos_id, tool_calls_id, pieces, frozenset(control), encode)


def _raw_from_project(tokenizer: Any) -> _RawVocab:
    """Read the project's ``mixtral.tokenizer.Tokenizer`` through its public API."""
    n = int(tokenizer.vocab_size)
    pieces: list[bytes] = []
    control: set[int] = set()
    for i in range(n):
        piece = b"" if tokenizer.is_control(i) else bytes(tokenizer.token_bytes(i))
        if not piece:  # control tokens and <unk>: never text, only reachable by id
            control.add(i)
        pieces.append(piece)

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, bos=False, eos=False))

    return _RawVocab(
        str(tokenizer.version),
        int(tokenizer.eos_id),
        getattr(tokenizer, "bos_id", None),
        tokenizer.tool_calls_id,
        pieces,
        frozenset(control),
        encode,
    )


def _raw_vocab(tokenizer: Any) -> _RawVocab:
    if hasattr(tokenizer, "token_bytes") and hasattr(tokenizer, "is_control"):
        return _raw_from_project(tokenizer)
    if hasattr(tokenizer, "instruct_tokenizer"):
        return _raw_from_mistral_common(tokenizer)
    raise TypeError(
        f"unsupported tokenizer {type(tokenizer).__name__}: expected mixtral.tokenizer.Tokenizer or "
        "mistral_common MistralTokenizer"
    )


def _raw_encoder(raw: _RawVocab) -> Callable[[bytes | str], list[int]]:
    """Tokenize text *without* SentencePiece's dummy-prefix space, as llguidance expects.

    SentencePiece turns "abc" into "▁abc" (a leading space). Encoding "\\n" + text instead puts that space on the
    newline, which is a byte-fallback token that never merges; everything after the first newline token is
    exactly ``text``. Verified on a probe at build time.
    """
    newline_ids = [i for i, b in enumerate(raw.token_bytes) if b == b"\n" and i not in raw.control_ids]
    if not newline_ids:
        raise ValueError("the vocabulary has no single-newline token; cannot build the llguidance tokenizer")
    newline_id = newline_ids[0]

    def encode(text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        ids = raw.encode("\n" + text)
        return ids[ids.index(newline_id) + 1 :]

    probe = '{"a": [1, 2.5, "x y"]}\n  é中😀 [TOOL_CALLS]'
    got = b"".join(raw.token_bytes[i] for i in encode(probe))
    if got != probe.encode("utf-8"):
        raise ValueError(f"tokenizer round trip failed on a probe: {got!r} != {probe.encode()!r}")
    return encode


class _WrapperSource:
    """The duck-typed object ``llguidance.TokenizerWrapper`` reads (tokens, special ids, encode)."""

    def __init__(self, raw: _RawVocab) -> None:
        self.eos_token_id = raw.eos_id
        self.bos_token_id = raw.bos_id
        # llguidance names special tokens "<...>"; the names are only used for debugging, grammars use ids.
        self.tokens = [b"<ctrl_%d>" % i if i in raw.control_ids else b for i, b in enumerate(raw.token_bytes)]
        self.special_token_ids = sorted(raw.control_ids)
        self._encode = _raw_encoder(raw)

    def __call__(self, text: bytes | str) -> list[int]:
        return self._encode(text)


def _build(tokenizer: Any) -> LLVocab:
    raw = _raw_vocab(tokenizer)
    ll_tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(_WrapperSource(raw)))
    return LLVocab(
        version=raw.version,
        vocab_size=len(raw.token_bytes),
        eos_id=raw.eos_id,
        tool_calls_id=raw.tool_calls_id,
        token_bytes=raw.token_bytes,
        control_ids=raw.control_ids,
        ll_tokenizer=ll_tokenizer,
    )


_cache: weakref.WeakKeyDictionary[Any, LLVocab] = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def llg_vocab(tokenizer: Any) -> LLVocab:
    """The (cached) ``LLVocab`` of a tokenizer object."""
    if isinstance(tokenizer, LLVocab):
        return tokenizer
    with _cache_lock:
        vocab = _cache.get(tokenizer)
        if vocab is None:
            vocab = _build(tokenizer)
            _cache[tokenizer] = vocab
        return vocab

"""Compiling a request's grammar at admission, within bounds, and a byte-bounded cache of what compiled.

``GuideCompiler.compile`` turns a Lark grammar into a pristine llguidance matcher (a request gets a deep copy)
under ``GuideLimits``: llguidance's parser limits bound the compile work and the lexer's memory, and a *trial
walk* then follows the grammar for up to ``probe_tokens`` tokens (forced tokens, else the allowed token with the
most bytes). Grammars that blow up only after a few tokens (a ``$ref`` cycle whose every branch is required, a
pattern such as ``^(a{1000}){1000}$``) hit llguidance's limits in that walk and are refused with a
``GuideError`` (a 400) before the request is admitted, instead of failing mid-stream.

The cache is keyed by client input, so it is bounded in bytes (``cache_bytes``, least recently used out first)
and holds only grammars that compiled and passed the walk; a grammar that later fails while running is evicted
(``evict``). Compiled matchers live in native memory that Python cannot measure: an entry's cost is estimated
from its grammar's size (about 48 bytes of matcher per grammar byte plus ~0.2 MB, measured with llguidance 1.9;
the estimate rounds both up).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

import llguidance as llg
import torch

from mixtral.guide import bitmask_words
from mixtral.serve.grammar import DEFAULT_MAX_SCHEMA_BYTES, DEFAULT_MAX_SCHEMA_DEPTH, GuideError, SchemaLimits
from mixtral.serve.llg_vocab import LLVocab

DEFAULT_CACHE_BYTES = 128 * 1024 * 1024
_BYTES_PER_GRAMMAR_BYTE = 64
_BYTES_PER_ENTRY = 256 * 1024
V = TypeVar("V")


@dataclass(frozen=True)
class GuideLimits:
    """What one request's constrained decoding may cost (``mixtral serve --guided-cache-bytes`` etc.)."""

    cache_bytes: int = DEFAULT_CACHE_BYTES  # compiled grammars kept for reuse, estimated bytes (0: no cache)
    max_schema_bytes: int = DEFAULT_MAX_SCHEMA_BYTES  # each JSON schema of a request, as compact JSON
    max_schema_depth: int = DEFAULT_MAX_SCHEMA_DEPTH  # JSON nesting of each schema
    probe_tokens: int = 64  # length of the trial walk through a newly compiled grammar (0: none)
    max_lexer_states: int = 50_000  # llguidance lexer states per grammar (1-2 kB each; its default is 250k)
    max_grammar_size: int = 500_000  # llguidance: symbols in the grammar's productions

    def __post_init__(self) -> None:
        for name in ("cache_bytes", "probe_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"GuideLimits.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_schema_bytes", "max_schema_depth", "max_lexer_states", "max_grammar_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"GuideLimits.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def schema(self) -> SchemaLimits:
        return SchemaLimits(self.max_schema_bytes, self.max_schema_depth)


class ByteBoundedCache(Generic[V]):
    """A thread-safe LRU map whose entries each cost a given number of bytes, kept under ``capacity`` bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: V, nbytes: int) -> None:
        """Insert (an entry bigger than the whole cache is not kept), evicting the least recently used."""
        if nbytes > self.capacity:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, nbytes)
            self._bytes += nbytes
            while self._bytes > self.capacity:
                _, (_, size) = self._items.popitem(last=False)
                self._bytes -= size

    def discard(self, key: Hashable, value: V | None = None) -> None:
        """Drop ``key`` (only if it still maps to ``value``, when given)."""
        with self._lock:
            item = self._items.get(key)
            if item is not None and (value is None or item[0] is value):
                del self._items[key]
                self._bytes -= item[1]


def first_line(error: str) -> str:
    """llguidance errors carry a parser-state dump after the first line; keep the readable part."""
    return error.split("\n", 1)[0]


def _explain(error: str) -> str:
    if "Unimplemented keys" in error:
        return f"the schema uses JSON Schema keywords constrained decoding cannot enforce: {first_line(error)}"
    return f"cannot build a grammar for this schema: {first_line(error)}"


class GuideCompiler:
    """Grammar -> pristine matcher, compiled under ``limits`` and cached (see the module docstring)."""

    def __init__(self, limits: GuideLimits | None = None) -> None:
        self.limits = limits or GuideLimits()
        self.cache: ByteBoundedCache[llg.LLMatcher] = ByteBoundedCache(self.limits.cache_bytes)
        self._parser_limits = llg.LLParserLimits(max_lexer_states=self.limits.max_lexer_states,
                                                 max_grammar_size=self.limits.max_grammar_size,
                                                 verbose_errors=False)
        self._piece_lengths: dict[LLVocab, torch.Tensor] = {}

    def cached(self, key: Hashable) -> llg.LLMatcher | None:
        return self.cache.get(key)

    def store(self, key: Hashable, key_bytes: int, value: llg.LLMatcher, grammar_bytes: int) -> None:
        """Keep a compiled (and probed) value: its cost is the key's size plus the matcher's estimated one."""
        self.cache.put(key, value, key_bytes + _BYTES_PER_ENTRY + _BYTES_PER_GRAMMAR_BYTE * grammar_bytes)

    def evict(self, key: Hashable, value: llg.LLMatcher) -> None:
        """A guide made from ``value`` failed while running: never hand it out again."""
        self.cache.discard(key, value)

    def compile(self, vocab: LLVocab, grammar: str) -> llg.LLMatcher:
        """A pristine matcher for the Lark ``grammar``; raises ``GuideError`` when it does not compile within the
        limits or fails the trial walk."""
        matcher = llg.LLMatcher(vocab.ll_tokenizer, llg.LLMatcher.grammar_from_lark(grammar), log_level=0,
                                limits=self._parser_limits)
        if matcher.is_error():
            raise GuideError(_explain(matcher.get_error()))
        if self.limits.probe_tokens:
            self._probe(vocab, matcher.deep_copy())
        return matcher

    def _probe(self, vocab: LLVocab, matcher: llg.LLMatcher) -> None:
        """Walk ``matcher`` (a copy) along one possible answer; raise ``GuideError`` if llguidance fails on it."""
        lengths = self._piece_lengths.get(vocab)
        if lengths is None:
            lengths = torch.tensor([len(b) for b in vocab.token_bytes], dtype=torch.float32)  # [V]
            lengths[vocab.eos_id] = -1.0  # never chosen: the walk wants to go on
            self._piece_lengths[vocab] = lengths
        words = bitmask_words(vocab.vocab_size)
        row = torch.zeros(words, dtype=torch.int32)  # [W]
        bits = torch.arange(32, dtype=torch.int32)  # [32]
        taken = 0
        while taken < self.limits.probe_tokens and not matcher.is_stopped():
            forced = matcher.compute_ff_tokens()
            if matcher.is_error():
                break
            if forced:
                matcher.consume_tokens(forced)
                taken += len(forced)
                continue
            matcher.unsafe_compute_mask_ptr(row.data_ptr(), words * 4)
            if matcher.is_error():
                break
            allowed = ((row.unsqueeze(-1) >> bits) & 1).bool().flatten()[: vocab.vocab_size]  # [V]
            scores = torch.where(allowed, lengths, torch.full_like(lengths, -2.0))  # [V]
            token = int(scores.argmax())
            if scores[token] < 0:
                break  # only EOS (or nothing) is left: the answer is complete
            matcher.consume_token(token)
            taken += 1
        if matcher.is_error():
            raise GuideError(f"constrained decoding cannot follow this grammar: a trial answer made it fail after "
                             f"{taken} token(s) ({first_line(matcher.get_error())}); simplify the schema (a "
                             f"required recursive $ref, a pattern with huge repetitions, ...)")


_default: GuideCompiler | None = None
_default_lock = threading.Lock()


def default_compiler() -> GuideCompiler:
    """The process's compiler (created on first use with default limits; ``configure`` replaces it)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = GuideCompiler()
        return _default


def configure(limits: GuideLimits) -> GuideCompiler:
    """Use ``limits`` for the guides built from now on (a server does this at start-up); returns the compiler.
    A compiler with equal limits is kept, cache and all."""
    global _default
    with _default_lock:
        if _default is None or _default.limits != limits:
            _default = GuideCompiler(limits)
        return _default

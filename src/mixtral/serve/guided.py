"""Constrained decoding: tool calls and JSON answers guaranteed valid, as ``mixtral.guide.TokenGuide`` objects.

``build_guide`` turns a request's ``tools`` / ``tool_choice`` / ``response_format`` / ``parallel_tool_calls`` into
a guide the engine runs next to sampling (see ``mixtral.guide``):

- ``tool_choice`` any / required / named: ``[TOOL_CALLS]`` then a JSON list of calls whose names are tools of the
  request (the named one) and whose arguments validate against that tool's ``parameters`` schema, then EOS;
- ``auto``: free text (never containing a control token) or such a call; ``none``: the [TOOL_CALLS] token is banned;
- ``response_format`` json_object / json_schema: one JSON value valid against the schema.

The grammars are compiled by llguidance (``grammar.py`` writes them, ``guide_compiler.py`` compiles them within
bounds, tries them and caches them); the masks are computed in its native code, which releases the GIL, so the
engine can fill many rows on threads while the forward pass runs. A guide whose grammar fails while running raises
``GuideError`` (the engine fails that request alone) and its grammar leaves the cache.
``parse_tool_calls`` reads the generated call list back.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable
from typing import Any

import llguidance as llg
import torch

from mixtral.guide import TokenGuide, bitmask_words
from mixtral.serve.grammar import GuideError, lark_grammar, plan_guide
from mixtral.serve.guide_compiler import GuideCompiler, default_compiler, first_line
from mixtral.serve.limits import value_depth
from mixtral.serve.llg_vocab import LLVocab, llg_vocab

__all__ = ["BanTokensGuide", "GuideError", "LLGuide", "build_guide", "build_lark_guide", "parse_tool_calls"]


def _check_row(row: torch.Tensor) -> None:
    if row.dtype != torch.int32 or row.device.type != "cpu" or row.dim() != 1 or not row.is_contiguous():
        raise ValueError(
            f"bitmask row must be a contiguous 1-D int32 CPU tensor, got {row.dtype} {tuple(row.shape)} on {row.device}"
        )


class LLGuide:
    """One sequence's grammar state: an llguidance matcher over the tokenizer's vocabulary.

    ``on_error`` runs once if the matcher fails (the grammar hit llguidance's limits while running): the compiler
    evicts the grammar, so no later request gets it from the cache.
    """

    __slots__ = ("_eos_id", "_matcher", "_on_error", "_words")

    def __init__(self, matcher: llg.LLMatcher, words: int, eos_id: int,
                 on_error: Callable[[], None] | None = None) -> None:
        self._matcher = matcher
        self._words = words  # int32 words llguidance writes (the tokenizer's vocabulary)
        self._eos_id = eos_id
        self._on_error = on_error

    def _failed(self, what: str) -> GuideError:
        if self._on_error is not None:
            self._on_error()
        return GuideError(f"constrained decoding stopped {what}: {first_line(self._matcher.get_error())}")

    def fill_bitmask(self, bitmask_row: torch.Tensor) -> None:
        """Allowed next tokens -> ``bitmask_row`` (int32 [W], CPU); native code, runs without the GIL.

        The row follows the model's vocabulary: words past the tokenizer's are zeroed (never allowed); a model
        vocabulary smaller than the tokenizer's (8x22B base: 32000 logits, v3 tokenizer) gets the prefix, as
        the model cannot produce the ids beyond it anyway.
        """
        _check_row(bitmask_row)
        n = bitmask_row.numel()
        if n >= self._words:
            bitmask_row[self._words :].zero_()
            self._matcher.unsafe_compute_mask_ptr(bitmask_row.data_ptr(), self._words * 4)
        else:
            full = torch.empty(self._words, dtype=torch.int32)  # [W_tokenizer]
            self._matcher.unsafe_compute_mask_ptr(full.data_ptr(), self._words * 4)
            bitmask_row.copy_(full[:n])
        if self._matcher.is_error():
            raise self._failed("computing the allowed tokens")

    def accept_token(self, token_id: int) -> None:
        """Advance by the sampled token; raises ``GuideError`` when the matcher fails (the grammar hit a limit, or
        the token was not allowed)."""
        if self._matcher.is_stopped() and not self._matcher.is_error() and token_id == self._eos_id:
            return  # EOS after the grammar completed: nothing left to advance
        if not self._matcher.consume_token(token_id):
            raise self._failed(f"at token {token_id}")

    def is_finished(self) -> bool:
        """True once the grammar can take nothing but EOS (or took it)."""
        return self._matcher.is_stopped()

    def is_accepting(self) -> bool:
        """True when the output so far is a complete answer (EOS is allowed now)."""
        return self._matcher.is_accepting()

    def copy(self) -> LLGuide:
        return LLGuide(self._matcher.deep_copy(), self._words, self._eos_id, self._on_error)


class BanTokensGuide:
    """Stateless guide that forbids a fixed set of tokens (tool_choice 'none': the [TOOL_CALLS] token)."""

    __slots__ = ("_row",)

    def __init__(self, vocab_size: int, banned: list[int]) -> None:
        row = torch.full((bitmask_words(vocab_size),), -1, dtype=torch.int32)  # [W], all allowed
        bits = row.view(torch.uint8)  # [4W]; little-endian words: token t is bit t % 8 of byte t // 8
        for t in banned:
            bits[t // 8] &= ~(1 << (t % 8)) & 0xFF
        self._row = row

    def fill_bitmask(self, bitmask_row: torch.Tensor) -> None:
        _check_row(bitmask_row)
        n = min(bitmask_row.numel(), self._row.numel())
        bitmask_row[:n].copy_(self._row[:n])
        bitmask_row[n:].zero_()

    def accept_token(self, token_id: int) -> None:
        pass

    def is_finished(self) -> bool:
        return False

    def copy(self) -> BanTokensGuide:
        return self  # immutable


def build_guide(
    tokenizer: Any,
    *,
    tools: list[dict[str, Any]] | None = None,
    tool_choice: Any = "auto",
    response_format: dict[str, Any] | None = None,
    parallel_tool_calls: bool = True,
    compiler: GuideCompiler | None = None,
) -> TokenGuide | None:
    """A guide for one request, or None when nothing constrains the output (plain text, no tools).

    ``tokenizer``: ``mixtral.tokenizer.Tokenizer`` or mistral-common ``MistralTokenizer``. ``tools``, ``tool_choice``
    (``auto``/``none``/``any``/``required``/``{"type": "function", "function": {"name": ...}}``),
    ``response_format`` (``{"type": "text"|"json_object"|"json_schema", "json_schema": {"schema": ...}}``) as in
    the Mistral/OpenAI chat API. With a forced call, ``response_format`` does not apply (the answer is the call).
    Raises ``GuideError`` for an invalid schema, an unknown tool name, tools on a vocabulary without
    [TOOL_CALLS], a schema past ``compiler``'s limits (size, depth), a schema keyword llguidance cannot enforce, or
    a grammar that fails its trial walk (see ``guide_compiler``). Compiling may take a few ms (more for huge
    schemas; repeated requests hit ``compiler``'s cache, the process's default one when None): call it off the
    event loop.
    """
    compiler = compiler or default_compiler()
    vocab = llg_vocab(tokenizer)
    key = _request_key(vocab, compiler, tools, tool_choice, response_format, parallel_tool_calls)
    template = compiler.cached(key) if key is not None else None
    if template is None:
        plan = plan_guide(
            version=vocab.version,
            has_tool_calls_token=vocab.tool_calls_id is not None,
            tools=tools,
            tool_choice=tool_choice,
            response_format=response_format,
            parallel_tool_calls=parallel_tool_calls,
            limits=compiler.limits.schema,
        )
        if plan.json_schema is None and plan.mode in ("free", "none"):
            if plan.mode == "none" and vocab.tool_calls_id is not None:
                return BanTokensGuide(vocab.vocab_size, [vocab.tool_calls_id])
            return None
        grammar = lark_grammar(plan, vocab.tool_calls_id)
        template = compiler.compile(vocab, grammar)
        if key is not None:
            compiler.store(key, len(key[1]), template, len(grammar))
    on_error = (lambda: compiler.evict(key, template)) if key is not None else None
    return LLGuide(template.deep_copy(), bitmask_words(vocab.vocab_size), vocab.eos_id, on_error)


def _request_key(vocab: LLVocab, compiler: GuideCompiler, tools: Any, tool_choice: Any, response_format: Any,
                 parallel_tool_calls: bool) -> tuple[Hashable, str] | None:
    """The cache key of a request's constraint fields, or None when they are not plain JSON within the depth
    limit (``plan_guide`` then says what is wrong)."""
    fields = [tools, tool_choice, response_format, parallel_tool_calls]
    # Each schema sits a few levels below the top (fields -> tools -> tool -> function -> parameters).
    if value_depth(fields, compiler.limits.max_schema_depth + 8) > compiler.limits.max_schema_depth + 8:
        return None
    try:
        return vocab, json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        return None


def build_lark_guide(tokenizer: Any, grammar: str, compiler: GuideCompiler | None = None) -> TokenGuide:
    """A guide for a caller-written Lark grammar (llguidance's dialect): vLLM's regex / choice / grammar extras
    (``structured.py``). Compiled within the compiler's limits, trial-walked and cached like ``build_guide``'s;
    raises ``GuideError`` when it does not compile or fails its trial walk."""
    compiler = compiler or default_compiler()
    vocab = llg_vocab(tokenizer)
    if len(grammar) > compiler.limits.max_schema_bytes:
        raise GuideError(f"the grammar is {len(grammar)} bytes; at most {compiler.limits.max_schema_bytes} are "
                         f"accepted (--max-guided-schema-bytes)")
    key = (vocab, "lark:" + grammar)
    template = compiler.cached(key)
    if template is None:
        template = compiler.compile(vocab, grammar)
        compiler.store(key, len(grammar), template, len(grammar))
    return LLGuide(template.deep_copy(), bitmask_words(vocab.vocab_size), vocab.eos_id,
                   lambda: compiler.evict(key, template))


def parse_tool_calls(tokenizer: Any, token_ids: list[int]) -> list[dict[str, Any]] | None:
    """Generated ids ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...] (EOS)`` -> ``[{"name", "arguments"}]``.

    ``arguments`` comes back as a dict (a JSON-encoded string is decoded). Returns None when the output does not
    start with [TOOL_CALLS] or what follows is not a well-formed non-empty call list (e.g. cut off by
    max_tokens on an unguided request). Extra keys of a call (such as an ``id``) are ignored.
    """
    vocab = llg_vocab(tokenizer)
    if vocab.tool_calls_id is None or not token_ids or token_ids[0] != vocab.tool_calls_id:
        return None
    body = [t for t in token_ids[1:] if t != vocab.eos_id]
    try:
        value = json.loads(vocab.decode_bytes(body).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(value, dict):  # a single call without the list brackets
        value = [value]
    if not isinstance(value, list) or not value:
        return None
    calls: list[dict[str, Any]] = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        args = item.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        if not isinstance(args, dict):
            return None
        calls.append({"name": item["name"], "arguments": args})
    return calls

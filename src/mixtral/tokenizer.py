"""The project's tokenizer: a thin wrapper over mistral-common's official Mixtral tokenizers.

Mixtral-8x7B uses SentencePiece tokenizer v1 (32000 ids, ``[INST]`` is plain text, no tools);
Mixtral-8x22B-Instruct uses v3 (32768 ids, control tokens for instructions and tools). Both files ship inside
mistral-common. Chat prompts are built only through mistral-common's ``ChatCompletionRequest`` +
``encode_chat_completion``, never by a hand-written template, so they match the official encoding exactly.

This module adds what the engine, server and guided decoding need around it: control-token ids, raw bytes
per token (for grammar engines), dict-form (OpenAI/Mistral) chat messages with tool-call id normalisation,
and streaming detokenization (``IncrementalDetokenizer``, in ``mixtral.detokenizer``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mixtral.detokenizer import BYTE, CONTROL, NORMAL, UNKNOWN, IncrementalDetokenizer, decode_pieces

__all__ = ["ChatEncodingError", "IncrementalDetokenizer", "Tokenizer", "normalize_tool_call_id"]

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SURROGATE = re.compile("[\ud800-\udfff]")
_TOOL_CALL_ID = re.compile(r"[a-zA-Z0-9]{9}")
_BASE62 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ROLES = ("system", "user", "assistant", "tool")
_VERSIONS = ("v1", "v3")
_V3_VOCAB = 32768


class ChatEncodingError(ValueError):
    """A chat request that cannot be encoded: what was wrong and where (message index, field, value)."""


def normalize_tool_call_id(tool_call_id: str) -> str:
    """Map any tool-call id to the 9 ``[a-zA-Z0-9]`` characters Mistral's format requires.

    Valid ids are kept; any other string (OpenAI's ``call_...`` ids, UUIDs) maps deterministically to a hash,
    so an assistant's tool call and the tool message answering it still carry the same id.
    """
    if _TOOL_CALL_ID.fullmatch(tool_call_id):
        return tool_call_id
    value = int.from_bytes(hashlib.sha256(tool_call_id.encode("utf-8")).digest()[:8], "big")
    chars = []
    for _ in range(9):
        value, digit = divmod(value, 62)
        chars.append(_BASE62[digit])
    return "".join(chars)


class Tokenizer:
    """One Mixtral tokenizer (v1 or v3). Build it with ``from_version``, ``from_file`` or ``for_model``."""

    def __init__(self, mistral_tokenizer: Any) -> None:
        """Wrap a ``mistral_common`` ``MistralTokenizer`` built on a SentencePiece model."""
        from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer

        self._mt = mistral_tokenizer
        raw = mistral_tokenizer.instruct_tokenizer.tokenizer
        if not isinstance(raw, SentencePieceTokenizer):
            raise ValueError(
                f"Mixtral tokenizers are SentencePiece (v1/v3); got a {type(raw).__name__} tokenizer "
                f"(version {raw.version.value}). Use the tokenizer file that ships with the Mixtral checkpoint."
            )
        self._sp = raw
        self.version: str = raw.version.value
        self.vocab_size: int = raw.n_words
        self.bos_id: int = raw.bos_id
        self.eos_id: int = raw.eos_id
        self.unk_id: int = raw.unk_id
        self._special: frozenset[int] = frozenset(raw.special_ids)

        def control(piece: str) -> int | None:
            token_id = raw.get_special_token(piece)
            return token_id if token_id in self._special else None  # SentencePiece answers unk for unknown pieces

        self.inst_id = control("[INST]")
        self.inst_end_id = control("[/INST]")
        self.tool_calls_id = control("[TOOL_CALLS]")
        self.available_tools_id = control("[AVAILABLE_TOOLS]")
        self.available_tools_end_id = control("[/AVAILABLE_TOOLS]")
        self.tool_results_id = control("[TOOL_RESULTS]")
        self.tool_results_end_id = control("[/TOOL_RESULTS]")
        self.supports_tools: bool = self.tool_calls_id is not None and self.available_tools_id is not None

        # Per-id tables the detokenizer replays SentencePiece's decoding from (see mixtral.detokenizer).
        # piece_texts: NORMAL -> text with '▁' as ' '; BYTE -> chr(byte); CONTROL -> the piece; UNKNOWN -> " ⁇ ".
        unk_surface = raw.decode([self.unk_id])
        self.piece_kinds: list[int] = []
        self.piece_texts: list[str] = []
        for token_id, piece in enumerate(raw.vocab()):
            byte = _BYTE_PIECE.fullmatch(piece)
            if token_id in self._special:
                kind, text = CONTROL, piece
            elif token_id == self.unk_id:
                kind, text = UNKNOWN, unk_surface
            elif byte:
                kind, text = BYTE, chr(int(byte.group(1), 16))
            else:
                kind, text = NORMAL, piece.replace("▁", " ")
            self.piece_kinds.append(kind)
            self.piece_texts.append(text)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_version(cls, version: str) -> Tokenizer:
        """The tokenizer shipped with mistral-common for ``version`` ("v1" or "v3")."""
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        if version == "v1":
            return cls(MistralTokenizer.v1())
        if version == "v3":
            return cls(MistralTokenizer.v3())
        raise ValueError(f"unknown tokenizer version {version!r}: Mixtral uses 'v1' (8x7B) or 'v3' (8x22B-Instruct)")

    @classmethod
    def from_file(cls, path: str | Path, version: str | None = None) -> Tokenizer:
        """Load a SentencePiece tokenizer file (``tokenizer.model.v1``, ``tokenizer.model.v3``, ``tokenizer.model``).

        The version is ``version`` when given, else the file name's suffix as mistral-common reads it; a bare
        ``tokenizer.model`` (as Hub repos ship it) is v3 when it has 32768 ids and v1 otherwise.
        """
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        if version is not None and version not in _VERSIONS:
            raise ValueError(f"unknown tokenizer version {version!r}: Mixtral uses {' or '.join(_VERSIONS)}")
        try:
            if version is None and not path.name.endswith(".model"):
                return cls(MistralTokenizer.from_file(str(path)))
            return cls(_assemble(path, version))
        except (ValueError, FileNotFoundError):
            raise
        except Exception as exc:  # mistral-common raises TokenizerException/AssertionError on unknown files
            raise ValueError(f"cannot load tokenizer file {path}: {exc}") from exc

    @classmethod
    def for_model(cls, source: Any) -> Tokenizer:
        """The tokenizer of a resolved model (``mixtral.checkpoint.loader.ModelSource``): the tokenizer file in
        its folder when there is one (read as the version its ``ModelArgs.tokenizer`` names), else the packaged
        file of that version."""
        tokenizer_file = getattr(source, "tokenizer_file", None)
        if tokenizer_file is not None:
            tokenizer = cls.from_file(tokenizer_file, version=source.args.tokenizer)
        else:
            tokenizer = cls.from_version(source.args.tokenizer)
        model_vocab = getattr(source.args, "vocab_size", None)
        if model_vocab is not None and tokenizer.vocab_size > model_vocab:
            # e.g. a v3 tokenizer file dropped into an 8x7B folder: its ids past the model's rows would crash
            # the embedding, and the ids below them mean other words (v3 ids are v1's + 768).
            raise ValueError(
                f"the {tokenizer.version} tokenizer {tokenizer_file or '(packaged)'} has {tokenizer.vocab_size} ids "
                f"but the model {getattr(source, 'name', '')!r} has a vocabulary of {model_vocab}: they "
                "do not belong together; put the model's own tokenizer file in its folder"
            )
        return tokenizer

    @property
    def mistral_tokenizer(self) -> Any:
        """The wrapped ``mistral_common`` ``MistralTokenizer`` (for code that speaks its API directly)."""
        return self._mt

    # ------------------------------------------------------------------ plain text
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of ``text`` (with ``<s>`` first when ``bos``, ``</s>`` last when ``eos``)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return list(self._sp.encode(scrub_surrogates(text), bos=bos, eos=eos))

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of ``ids``. ``skip_special=False`` renders control tokens as their pieces (``<s>``, ``[INST]``)."""
        ids = [int(i) for i in ids]
        for token_id in ids:
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        if skip_special:
            return self._sp.decode(ids)  # SentencePiece's own decode: the ground truth for plain text
        return decode_pieces(self, ids, skip_special=False)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes a token contributes to text, for grammar engines: a byte-fallback piece is that byte,
        ``▁`` is a space (never stripped here); control tokens and the unknown token give ``b""``."""
        kind = self.piece_kinds[token_id]
        if kind == NORMAL:
            return self.piece_texts[token_id].encode("utf-8")
        if kind == BYTE:
            return bytes([ord(self.piece_texts[token_id])])
        return b""

    def is_control(self, token_id: int) -> bool:
        """True for control tokens (``<s>``, ``</s>``, ``[INST]``, tool tokens...), which decode to nothing."""
        return token_id in self._special

    def id_to_piece(self, token_id: int) -> str:
        """The SentencePiece piece of an id (``▁Hello``, ``<0x0A>``, ``[INST]``)."""
        return self._sp.id_to_piece(token_id)

    def detokenizer(self, skip_special: bool = True, prompt_ids: Sequence[int] | None = None) -> IncrementalDetokenizer:
        """A fresh streaming detokenizer over this vocabulary."""
        return IncrementalDetokenizer(self, skip_special=skip_special, prompt_ids=prompt_ids)

    # ------------------------------------------------------------------ chat
    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Prompt ids for a conversation in OpenAI/Mistral dict form, exactly as mistral-common encodes it.

        ``messages``: ``{"role": "system"|"user"|"assistant"|"tool", "content": str | None | [{"type": "text",
        "text": ...}], "tool_calls": [...], "tool_call_id": ..., "name": ..., "prefix": bool}``. A final assistant
        message with ``"prefix": True`` is continued by the model. ``tools``: ``[{"type": "function",
        "function": {"name", "description", "parameters"}}]``. Raises ``ChatEncodingError`` on bad input.
        """
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.request import ChatCompletionRequest
        from pydantic import ValidationError

        messages, tools = scrub_surrogates(messages), scrub_surrogates(tools)
        prepared, continue_final = self._prepare_messages(messages)
        if tools and not self.supports_tools:
            raise ChatEncodingError(
                f"this model's tokenizer ({self.version}) has no tool tokens, so it cannot take tools; "
                "use a model with tokenizer v3 (e.g. Mixtral-8x22B-Instruct) or drop 'tools'"
            )
        if tools is not None and not isinstance(tools, list):
            raise ChatEncodingError(f"'tools' must be a list of tool objects, got {type(tools).__name__}")
        try:
            request = ChatCompletionRequest.from_openai(
                prepared, tools or None, continue_final_message=continue_final
            )
            return list(self._mt.encode_chat_completion(request).tokens)
        except (MistralCommonException, ValidationError, ValueError, TypeError, KeyError, AssertionError) as exc:
            raise ChatEncodingError(f"invalid chat request: {exc}") from exc

    def _prepare_messages(self, messages: Any) -> tuple[list[dict[str, Any]], bool]:
        """Check roles and content types, normalise tool-call ids; return the messages for mistral-common and
        whether the last one is an assistant prefix to continue."""
        if not isinstance(messages, list) or not messages:
            raise ChatEncodingError("'messages' must be a non-empty list of message objects")
        prepared: list[dict[str, Any]] = []
        continue_final = False
        for index, message in enumerate(messages):
            where = f"messages[{index}]"
            if not isinstance(message, dict):
                raise ChatEncodingError(f"{where} must be an object, got {type(message).__name__}")
            role = message.get("role")
            if role not in _ROLES:
                raise ChatEncodingError(f"{where} has unknown role {role!r}; expected one of {', '.join(_ROLES)}")
            msg = {key: value for key, value in message.items() if key != "prefix"}
            msg["content"] = _check_content(message.get("content"), where)
            if message.get("prefix"):
                if role != "assistant" or index != len(messages) - 1:
                    raise ChatEncodingError(f"{where}: 'prefix' is only allowed on the last message, an assistant one")
                continue_final = True
            if role == "assistant" and message.get("tool_calls"):
                if not self.supports_tools:
                    raise ChatEncodingError(
                        f"{where} has tool_calls, but this model's tokenizer ({self.version}) has no tool tokens"
                    )
                msg["tool_calls"] = [_prepare_tool_call(call, f"{where}.tool_calls[{i}]")
                                     for i, call in enumerate(message["tool_calls"])]
            elif role == "assistant":
                msg.pop("tool_calls", None)  # OpenAI clients send "tool_calls": null / []
            if role == "tool":
                if not self.supports_tools:
                    raise ChatEncodingError(
                        f"{where} is a tool result, but this model's tokenizer ({self.version}) has no tool tokens"
                    )
                call_id = message.get("tool_call_id")
                if not isinstance(call_id, str) or not call_id:
                    raise ChatEncodingError(f"{where}: a tool message needs the 'tool_call_id' it answers")
                msg["tool_call_id"] = normalize_tool_call_id(call_id)
            prepared.append(msg)
        return prepared, continue_final


def scrub_surrogates(value: Any) -> Any:
    """``value`` with every lone UTF-16 surrogate in its strings (nested in lists and dicts too) replaced by
    U+FFFD.

    Python strings can hold them (a JSON ``"\\udcff"`` escape, bytes read with ``surrogateescape``) but UTF-8
    cannot, and SentencePiece fails on them with an opaque C++ cast error; a UTF-8 decoder with
    ``errors="replace"`` shows undecodable bytes the same way. Values without surrogates are returned as they are.
    """
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value) if _SURROGATE.search(value) else value
    if isinstance(value, list):
        return [scrub_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {k: scrub_surrogates(v) for k, v in value.items()}
    return value


def _check_content(content: Any, where: str) -> Any:
    """Content must be None, a string or a list of text parts (Mixtral reads no images)."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatEncodingError(f"{where}.content must be a string or a list of text parts, got "
                                f"{type(content).__name__}")
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ChatEncodingError(
                f"{where}.content[{i}] must be {{'type': 'text', 'text': str}}; got {kind!r} (Mixtral is text-only)"
            )
    return [{"type": "text", "text": part["text"]} for part in content]


def _prepare_tool_call(call: Any, where: str) -> dict[str, Any]:
    """Validate one assistant tool call and give it a Mistral-format id."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise ChatEncodingError(f"{where} must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}")
    call_id = call.get("id")
    if not isinstance(call_id, str) or not call_id:
        raise ChatEncodingError(f"{where} has no 'id'; tool results refer to their call by it")
    function = call["function"]
    if not isinstance(function.get("name"), str) or not function["name"]:
        raise ChatEncodingError(f"{where}.function needs a 'name'")
    arguments = function.get("arguments")
    if arguments is not None and not isinstance(arguments, (str, dict)):
        raise ChatEncodingError(f"{where}.function.arguments must be a JSON string or an object, "
                                f"got {type(arguments).__name__}")
    return {"id": normalize_tool_call_id(call_id), "type": "function",
            "function": {"name": function["name"], "arguments": arguments}}


def _assemble(path: Path, version: str | None) -> Any:
    """A ``MistralTokenizer`` over a SentencePiece file read as ``version`` (None: v3 for a 32768-id vocabulary,
    else v1), wired like mistral-common's ``from_file`` wires it (validator and normaliser of that version)."""
    from mistral_common.protocol.instruct.normalize import get_normalizer
    from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
    from mistral_common.tokens.tokenizers.base import TokenizerVersion
    from mistral_common.tokens.tokenizers.instruct import InstructTokenizerV1, InstructTokenizerV3
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer

    if version is None:
        version = "v3" if SentencePieceTokenizer(path).n_words == _V3_VOCAB else "v1"
    raw = SentencePieceTokenizer(path, tokenizer_version=TokenizerVersion(version))
    if version == "v3" and raw.n_words != _V3_VOCAB:
        raise ValueError(f"{path} has {raw.n_words} ids, but a v3 tokenizer has {_V3_VOCAB}")
    instruct = InstructTokenizerV3(raw) if version == "v3" else InstructTokenizerV1(raw)
    return MistralTokenizer(
        instruct,
        validator=get_validator(raw.version, mode=ValidationMode.test),
        request_normalizer=get_normalizer(raw.version, raw.model_settings_builder),
    )

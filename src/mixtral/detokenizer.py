"""Streaming detokenization for SentencePiece (v1/v3) vocabularies.

``IncrementalDetokenizer`` turns generated token ids into text one token at a time, so the CLI and the
server can stream. Every chunk it returns is complete text: a character spelled by several byte-fallback
pieces (``<0xE4><0xB8><0xAD>`` -> "中") is held back until its last byte arrives, and never leaks out as a
replacement character while it may still complete.

The text it produces is exactly what SentencePiece's own ``decode`` gives for the whole id list, because it
replays SentencePiece's decoding rules piece by piece (held equal to it by a property test):

- an ordinary piece is its text with ``▁`` read as a space; the first non-control piece of the output drops
  one leading space (SentencePiece's dummy prefix);
- consecutive byte pieces form one byte run, decoded as strict UTF-8 where each byte that is not part of a
  valid character becomes U+FFFD; any other piece (control tokens included) ends the run;
- control tokens are empty (or, with ``skip_special=False``, their own piece text such as ``[INST]``);
- the unknown token reads " ⁇ ".

Each ``add`` costs O(1): the only state is up to three pending bytes and whether output has started.
This module is not a tokenizer; it reads the per-id tables that ``mixtral.tokenizer.Tokenizer`` builds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mixtral.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"

# Piece kinds in Tokenizer.piece_kinds.
NORMAL, BYTE, CONTROL, UNKNOWN = 0, 1, 2, 3


def _utf8_length(lead: int) -> int:
    """Length of the UTF-8 character a lead byte announces; 0 when the byte cannot start one."""
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0  # continuation byte, overlong lead (C0/C1) or beyond U+10FFFF (F5..FF)


def _continuation_ok(lead: int, index: int, byte: int) -> bool:
    """Whether ``byte`` may stand at position ``index`` (>= 1) of a character led by ``lead`` (strict UTF-8:
    no overlong forms, no surrogates, nothing above U+10FFFF)."""
    if index == 1:
        low, high = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}.get(
            lead, (0x80, 0xBF)
        )
        return low <= byte <= high
    return 0x80 <= byte <= 0xBF


class _ByteRun:
    """UTF-8 decoder for one run of byte-fallback pieces, emitting each character as soon as it is complete.

    Invalid bytes become one U+FFFD each, as SentencePiece does (Python's ``errors="replace"`` would merge
    some of them). At most three bytes are ever pending: the start of a character that may still complete.
    """

    def __init__(self) -> None:
        self.pending = bytearray()

    def feed(self, byte: int) -> str:
        self.pending.append(byte)
        out: list[str] = []
        while self.pending:
            lead = self.pending[0]
            need = _utf8_length(lead)
            if need == 0:
                out.append(REPLACEMENT)
                del self.pending[0]
                continue
            have = min(need, len(self.pending))
            if not all(_continuation_ok(lead, i, self.pending[i]) for i in range(1, have)):
                out.append(REPLACEMENT)  # the lead cannot complete: it alone is replaced, the rest re-scanned
                del self.pending[0]
                continue
            if have < need:
                break  # a valid prefix: wait for the next byte
            out.append(bytes(self.pending[:need]).decode("utf-8"))
            del self.pending[:need]
        return "".join(out)

    def end(self) -> str:
        """End the run: an unfinished character's bytes become one U+FFFD each."""
        out = REPLACEMENT * len(self.pending)
        self.pending.clear()
        return out


class IncrementalDetokenizer:
    """Token ids in, newly completed text out.

    ``"".join(d.add(t) for t in ids) + d.flush() == tokenizer.decode(ids, skip_special)`` for any ids.

    ``prompt_ids`` (optional) are tokens that precede the output (the prompt): they produce no text, but the
    output then reads as ``decode(prompt + out)`` minus ``decode(prompt)``, so its first token keeps its
    leading space (" Paris" after "The capital of France is").
    """

    def __init__(
        self, tokenizer: Tokenizer, skip_special: bool = True, prompt_ids: Sequence[int] | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.text = ""
        self._kinds = tokenizer.piece_kinds
        self._texts = tokenizer.piece_texts
        self._run = _ByteRun()
        # Whether a visible piece has been emitted: only the very first one loses its leading space.
        self._started = False
        if prompt_ids:
            # Only one fact about the prompt matters: whether it shows any piece (then the output's first piece
            # keeps its space). A byte run the prompt leaves unfinished is not continued: prompts hold whole
            # characters. Scanning from the end stops at once for real prompts, which end in text or [/INST].
            self._started = any(self._visible(token_id) for token_id in reversed(prompt_ids))

    def add(self, token_id: int) -> str:
        """Consume one token; return the text it completes (possibly "")."""
        kinds = self._kinds
        if 0 <= token_id < len(kinds) and kinds[token_id] == NORMAL and self._started and not self._run.pending:
            # Most tokens of most outputs: an ordinary piece, nothing pending, no leading space to drop.
            chunk = self._texts[token_id]
            self.text += chunk
            return chunk
        chunk = self._step(token_id)
        self.text += chunk
        return chunk

    def flush(self) -> str:
        """End of output: return what is still pending (an unfinished character becomes U+FFFD per byte)."""
        chunk = self._run.end()
        self.text += chunk
        return chunk

    def _visible(self, token_id: int) -> bool:
        if not 0 <= token_id < len(self._kinds):
            raise ValueError(f"token id {token_id} is outside the vocabulary (size {len(self._kinds)})")
        return self._kinds[token_id] != CONTROL or not self.skip_special

    def _step(self, token_id: int) -> str:
        if not 0 <= token_id < len(self._kinds):
            raise ValueError(f"token id {token_id} is outside the vocabulary (size {len(self._kinds)})")
        kind = self._kinds[token_id]
        if kind == BYTE:
            self._started = True
            return self._run.feed(ord(self._texts[token_id]))  # a byte piece's text is chr(byte)
        before = self._run.end()  # any other piece ends a byte run, even an invisible control token
        if kind == CONTROL:
            if self.skip_special:
                return before
            self._started = True
            return before + self._texts[token_id]
        text = self._texts[token_id]
        if kind == NORMAL and not self._started and text.startswith(" "):
            text = text[1:]
        self._started = True
        return before + text


def decode_pieces(tokenizer: Tokenizer, ids: Sequence[int], skip_special: bool = True) -> str:
    """Decode a whole id list with the same rules as ``IncrementalDetokenizer`` (used for ``skip_special=False``,
    which SentencePiece itself cannot render)."""
    detok = IncrementalDetokenizer(tokenizer, skip_special=skip_special)
    parts = [detok._step(token_id) for token_id in ids]
    parts.append(detok._run.end())
    return "".join(parts)

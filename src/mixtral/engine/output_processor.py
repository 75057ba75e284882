"""OutputProcessor: after a token is sampled, update the sequence's text and decide whether it stops.

Stop rules, checked in this order (vLLM's): a finished guide; EOS (unless ``ignore_eos``); a stop token id;
a stop string in the new text (the text is cut before it); ``max_tokens``; the context length. EOS and stop
tokens add no text. Until a sequence finishes, the last ``len(longest stop string) - 1`` characters are held
back from its visible text, since they may be the start of a stop string that a later token completes:
streamed text never has to be taken back.
"""

from __future__ import annotations

from mixtral.engine.sequence import Sequence, SequenceGroup, SequenceStatus
from mixtral.tokenizer import Tokenizer


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None, eos_id: int, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.max_model_len = max_model_len

    def start(self, seq: Sequence, group: SequenceGroup) -> None:
        """Give a new sequence its streaming detokenizer, primed with the prompt."""
        if self.tokenizer is not None:
            seq.detokenizer = self.tokenizer.detokenizer(
                skip_special=seq.params.skip_special_tokens, prompt_ids=group.prompt_token_ids
            )

    def process_token(self, seq: Sequence, group: SequenceGroup, token_id: int) -> SequenceStatus | None:
        """Account for ``seq``'s newly appended ``token_id``; return the finish status, or None to go on."""
        params = seq.params
        num_tokens = len(seq.token_ids)
        num_output = num_tokens - seq.num_prompt_tokens
        may_stop = num_output >= params.min_tokens
        guide = params.guide
        if guide is not None:
            guide.accept_token(token_id)
        if may_stop and not params.ignore_eos and token_id == self.eos_id:
            return self._finish(seq, SequenceStatus.FINISHED_STOPPED, None)
        if may_stop and token_id in params.stop_token_ids:  # type: ignore[operator]
            return self._finish(seq, SequenceStatus.FINISHED_STOPPED, token_id)

        detok = seq.detokenizer
        if detok is not None:
            delta = detok.add(token_id)  # type: ignore[attr-defined]
            if delta:
                seq.text += delta
            if params.stop:
                if may_stop and delta:
                    hit = self._find_stop(seq.text, len(delta), params.stop)  # type: ignore[arg-type]
                    if hit is not None:
                        index, stop = hit
                        end = index + len(stop) if params.include_stop_str_in_output else index
                        seq.text = seq.text[:end]
                        return self._finish(seq, SequenceStatus.FINISHED_STOPPED, stop, flush=False)
                seq.text_holdback = min(len(seq.text), max(len(s) for s in params.stop) - 1)  # type: ignore[union-attr]

        if guide is not None and guide.is_finished():
            return self._finish(seq, SequenceStatus.FINISHED_STOPPED, None)
        if num_output >= group.max_output_tokens or num_tokens >= self.max_model_len:
            return self._finish(seq, SequenceStatus.FINISHED_LENGTH, None)
        return None

    @staticmethod
    def _find_stop(text: str, new_chars: int, stops: list[str]) -> tuple[int, str] | None:
        """Earliest stop string that ends inside the last ``new_chars`` characters of ``text``."""
        best: tuple[int, str] | None = None
        for stop in stops:
            # Only occurrences overlapping the new text are new; older ones would have stopped us already.
            start = max(0, len(text) - new_chars - len(stop) + 1)
            index = text.find(stop, start)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        return best

    def _finish(self, seq: Sequence, status: SequenceStatus, reason: int | str | None, flush: bool = True
                ) -> SequenceStatus:
        if flush and seq.detokenizer is not None:
            seq.text += seq.detokenizer.flush()  # type: ignore[attr-defined]
        seq.text_holdback = 0
        seq.stop_reason = reason
        return status

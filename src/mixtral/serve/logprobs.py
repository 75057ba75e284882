"""Engine logprobs -> the API's shapes: vLLM's ``prompt_logprobs`` and OpenAI's legacy completion ``logprobs``.

The engine gives, per position, ``{token id: logprob}`` holding the top-k alternatives and the actual token
(``SamplingParams.logprobs`` / ``prompt_logprobs``), under the model's raw distribution; the prompt's first position
has none (nothing predicts it). Values are clamped to a finite floor so that JSON can carry them.
Not here: chat's per-token ``logprobs.content`` entries (``chat.py``).
"""

from __future__ import annotations

from typing import Any

from mixtral.serve.responses import CompletionLogprobs, PromptLogprob, PromptLogprobs

# JSON has no -inf; vLLM clamps the same way.
LOGPROB_FLOOR = -9999.0


def finite(logprob: float) -> float:
    return max(float(logprob), LOGPROB_FLOOR)


def format_prompt_logprobs(tokenizer: Any, prompt_ids: list[int], entries: list[dict[int, float] | None],
                           k: int) -> PromptLogprobs:
    """vLLM's ``prompt_logprobs``: per prompt position None (the first) or {token id: {logprob, rank,
    decoded_token}} for the top ``k`` and the prompt's own token. ``rank`` is 1 for the most likely token; the
    prompt's token gets None when it is not among the top k (its rank was not computed)."""
    out: PromptLogprobs = []
    for pos, entry in enumerate(entries):
        if entry is None:
            out.append(None)
            continue
        ranked = sorted(entry.items(), key=lambda kv: -kv[1])
        own = prompt_ids[pos] if pos < len(prompt_ids) else None
        outside = own is not None and len(entry) > k  # the prompt's token came on top of the k best
        item: dict[str, PromptLogprob] = {}
        for rank, (token_id, lp) in enumerate(ranked, start=1):
            is_outside = outside and token_id == own
            item[str(token_id)] = PromptLogprob(logprob=finite(lp), rank=None if is_outside else rank,
                                                decoded_token=tokenizer.piece_texts[token_id])
        out.append(item)
    return out


def legacy_logprobs(tokenizer: Any, token_ids: list[int], entries: list[dict[int, float] | None],
                    start_offset: int = 0) -> CompletionLogprobs:
    """OpenAI's legacy ``logprobs`` for ``token_ids`` with their per-position ``entries`` (None: no logprob, the
    prompt's first token). ``text_offset`` counts characters of the token strings from ``start_offset``."""
    pieces = tokenizer.piece_texts
    tokens = [pieces[t] for t in token_ids]
    offsets = []
    at = start_offset
    for text in tokens:
        offsets.append(at)
        at += len(text)
    token_logprobs: list[float | None] = []
    top: list[dict[str, float] | None] = []
    for token_id, entry in zip(token_ids, entries, strict=True):
        if entry is None:
            token_logprobs.append(None)
            top.append(None)
            continue
        token_logprobs.append(finite(entry.get(token_id, LOGPROB_FLOOR)))
        alternatives: dict[str, float] = {}
        for t, lp in sorted(entry.items(), key=lambda kv: -kv[1]):
            alternatives.setdefault(pieces[t], finite(lp))  # two ids with one text: the likelier one stays
        top.append(alternatives)
    return CompletionLogprobs(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top, text_offset=offsets)

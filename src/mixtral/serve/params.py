"""API request fields -> the engine's ``SamplingParams``, with the context-length checks that give a 400.

Defaults follow Mistral's API for Mixtral (temperature 0.7, top_p 1, ``max_tokens`` up to the end of the context).
``random_seed`` (Mistral) and ``seed`` (OpenAI) are the same thing. ``top_p: 0`` (allowed by both APIs) means
greedy. A prompt that leaves no room for even one generated token, or ``max_tokens`` that would run past the
context, is refused with both numbers in the message, before the engine sees it.
"""

from __future__ import annotations

from mixtral.guide import TokenGuide
from mixtral.sampling import SamplingParams
from mixtral.serve.errors import APIError
from mixtral.serve.protocol import _SamplingFields

DEFAULT_TEMPERATURE = 0.7


def check_context(prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> int:
    """The number of tokens the request may generate; 400 when the prompt or max_tokens does not fit."""
    if prompt_tokens >= max_model_len:
        raise APIError(400, f"prompt is {prompt_tokens} tokens, but the model's context (max_model_len) is "
                            f"{max_model_len} tokens and must leave room for at least 1 generated token; "
                            f"shorten the prompt", param="messages", code="context_length_exceeded")
    room = max_model_len - prompt_tokens
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise APIError(400, f"max_tokens={max_tokens} plus the prompt's {prompt_tokens} tokens is "
                            f"{prompt_tokens + max_tokens}, past the model's context of {max_model_len} tokens; "
                            f"use max_tokens <= {room}", param="max_tokens", code="context_length_exceeded")
    return max_tokens


def check_token_ids(ids: list[int], vocab_size: int, field: str) -> None:
    """400 naming the first id outside the vocabulary (the engine would index past its embedding table)."""
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise APIError(400, f"{field} holds token id {bad[0]}, outside the vocabulary (0..{vocab_size - 1})",
                       param=field)


def check_n(n: int, max_num_seqs: int | None) -> None:
    """400 when the request asks for more samples than the engine runs at once (they are decoded together)."""
    if max_num_seqs is not None and n > max_num_seqs:
        raise APIError(400, f"n={n} samples cannot run together on this server, which decodes at most "
                            f"{max_num_seqs} sequences at once (--max-num-seqs); use n <= {max_num_seqs}",
                       param="n", code="invalid_request")


def sampling_params(req: _SamplingFields, *, prompt_tokens: int, max_model_len: int, vocab_size: int,
                    logprobs: int | None, guide: TokenGuide | None = None, max_num_seqs: int | None = None
                    ) -> SamplingParams:
    """SamplingParams for a chat or text completion request whose prompt is ``prompt_tokens`` long.

    ``max_num_seqs``: the engine's batch limit, checked here so that a streaming request gets a 400 rather than
    a 200 whose stream holds only the engine's refusal."""
    check_n(req.n or 1, max_num_seqs)
    check_token_ids(req.stop_token_ids or [], vocab_size, "stop_token_ids")
    max_tokens = check_context(prompt_tokens, req.effective_max_tokens, max_model_len)
    temperature = DEFAULT_TEMPERATURE if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    if top_p == 0.0:
        temperature, top_p = 0.0, 1.0
    try:
        return SamplingParams(
            n=req.n or 1,
            temperature=temperature,
            top_p=top_p,
            top_k=-1 if req.top_k is None else req.top_k,
            min_p=req.min_p or 0.0,
            seed=req.effective_seed,
            max_tokens=max_tokens,
            min_tokens=min(req.min_tokens or 0, max_tokens),
            stop=req.stop,
            stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0,
            skip_special_tokens=True,
            guide=guide,
        )
    except ValueError as exc:  # the protocol's ranges should have caught it; say which value anyway
        raise APIError(422, f"invalid sampling settings: {exc}", code="invalid_request") from exc

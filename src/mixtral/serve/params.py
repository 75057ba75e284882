"""API request fields -> the engine's ``SamplingParams``, with the checks that give a 400 before the engine sees it.

Defaults are ``mixtral.sampling``'s (temperature 0.7 as Mistral's API for Mixtral; top_p 1), except ``max_tokens``,
which runs to the end of the context as both hosted APIs do. ``random_seed`` (Mistral) and ``seed`` (OpenAI) are the
same thing. ``top_p: 0`` (allowed by both APIs) means greedy. A prompt that leaves no room for even one generated
token, ``max_tokens`` that would run past the context, token ids outside the vocabulary (prompt, stop tokens,
logit_bias) and ``n`` above the engine's batch are refused with the numbers in the message.
"""

from __future__ import annotations

from mixtral.guide import TokenGuide
from mixtral.sampling import (
    DEFAULT_FREQUENCY_PENALTY,
    DEFAULT_MIN_P,
    DEFAULT_PRESENCE_PENALTY,
    DEFAULT_REPETITION_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    SamplingParams,
)
from mixtral.serve.errors import APIError
from mixtral.serve.protocol import _SamplingFields


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


def logit_bias_of(req: _SamplingFields, vocab_size: int) -> dict[int, float] | None:
    """``{"123": 5.0}`` -> ``{123: 5.0}``, 400 for an id outside the vocabulary."""
    if not req.logit_bias:
        return None
    bias = {int(k): float(v) for k, v in req.logit_bias.items()}
    check_token_ids(sorted(bias), vocab_size, "logit_bias")
    return bias


def sampling_params(req: _SamplingFields, *, prompt_tokens: int, max_model_len: int, vocab_size: int,
                    logprobs: int | None, guide: TokenGuide | None = None, max_num_seqs: int | None = None,
                    max_tokens: int | None = None) -> SamplingParams:
    """SamplingParams for a chat or text completion request whose prompt is ``prompt_tokens`` long.

    ``max_num_seqs``: the engine's batch limit, checked here so that a streaming request gets a 400 rather than
    a 200 whose stream holds only the engine's refusal. ``max_tokens``: overrides the request's (a text completion
    with ``max_tokens: 0`` still runs one step to score its prompt)."""
    check_n(req.n or 1, max_num_seqs)
    check_token_ids(req.stop_token_ids or [], vocab_size, "stop_token_ids")
    limit = check_context(prompt_tokens, max_tokens if max_tokens is not None else req.effective_max_tokens,
                          max_model_len)
    temperature = DEFAULT_TEMPERATURE if req.temperature is None else req.temperature
    top_p = DEFAULT_TOP_P if req.top_p is None else req.top_p
    if top_p == 0.0:
        temperature, top_p = 0.0, 1.0
    try:
        return SamplingParams(
            n=req.n or 1,
            temperature=temperature,
            top_p=top_p,
            top_k=DEFAULT_TOP_K if req.top_k is None else req.top_k,
            min_p=DEFAULT_MIN_P if req.min_p is None else req.min_p,
            seed=req.effective_seed,
            max_tokens=limit,
            min_tokens=min(req.min_tokens or 0, limit),
            stop=req.stop,
            stop_token_ids=req.stop_token_ids,
            ignore_eos=bool(req.ignore_eos),
            logprobs=logprobs,
            prompt_logprobs=req.prompt_logprobs,
            presence_penalty=DEFAULT_PRESENCE_PENALTY if req.presence_penalty is None else req.presence_penalty,
            frequency_penalty=DEFAULT_FREQUENCY_PENALTY if req.frequency_penalty is None else req.frequency_penalty,
            repetition_penalty=(DEFAULT_REPETITION_PENALTY if req.repetition_penalty is None
                                else req.repetition_penalty),
            skip_special_tokens=req.skip_special_tokens is not False,
            logit_bias=logit_bias_of(req, vocab_size),
            guide=guide,
        )
    except ValueError as exc:  # the protocol's ranges should have caught it; say which value anyway
        raise APIError(400, f"invalid sampling settings: {exc}", code="invalid_request") from exc

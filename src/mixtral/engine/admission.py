"""Admission: a request as the caller gives it -> a validated ``SequenceGroup`` ready for the scheduler.

Everything that can be known wrong about a request before it runs is refused here, with a ``ValueError`` naming
the value: an empty prompt, token ids outside the vocabulary, stop token ids the sampler could not index,
sampling settings changed into invalid ones after construction, ``n`` above the batch, and
``RequestTooLongError`` for a request that can never fit the context or the KV cache. A request that passes
cannot make the batched sampler fail for the others. Per-request failures that only show while running
(a grammar that hits its limits, ...) are ``step_apply``'s business.
"""

from __future__ import annotations

import dataclasses
import random

import torch

from mixtral.engine.block_manager import BlockManager
from mixtral.engine.config import EngineConfig
from mixtral.engine.outputs import RequestMetrics
from mixtral.engine.sequence import Sequence, SequenceGroup
from mixtral.sampling import SamplingParams
from mixtral.tokenizer import Tokenizer


class RequestTooLongError(ValueError):
    """A request that can never be served: longer than max_model_len or than the whole KV cache."""


class Admission:
    """Builds the ``SequenceGroup`` of each new request (vLLM's input processing)."""

    def __init__(self, config: EngineConfig, vocab_size: int, tokenizer: Tokenizer | None,
                 block_manager: BlockManager) -> None:
        assert config.max_model_len is not None, "resolve() the config first"
        self.config = config
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.block_manager = block_manager
        self._rng = random.Random(config.seed)

    def new_request(self, request_id: str, prompt: str | list[int], params: SamplingParams, now: float
                    ) -> SequenceGroup:
        """The request's group holding its first sequence (n > 1 samples fork from it once the prompt is in)."""
        # SamplingParams validates on construction, but it is a plain dataclass a caller may have changed since:
        # a copy runs the checks again (an invalid value would otherwise fail the sampler for the whole batch).
        dataclasses.replace(params)
        prompt_ids, prompt_text = self._encode_prompt(prompt)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine has none (use stop_token_ids)")
        # The sampler indexes the logits with these (min_tokens bans them): one outside the vocabulary would
        # crash the step for every request in the batch, so it is refused here.
        for name, ids in (("stop_token_ids", params.stop_token_ids or []), ("logit_bias", params.logit_bias or {})):
            bad_ids = [t for t in ids if t >= self.vocab_size]
            if bad_ids:
                raise ValueError(f"{name} {bad_ids[:5]} are outside the vocabulary (size {self.vocab_size})")
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n={params.n} exceeds max_num_seqs={self.config.max_num_seqs}")
        max_out = self._check_fits(len(prompt_ids), params)
        samples = [params.clone() for _ in range(params.n)] if params.n > 1 else [params]
        seeds = [self._sample_seed(params.seed, i) for i in range(params.n)]
        first = Sequence(request_id, 0, list(prompt_ids), len(prompt_ids), samples[0], now, seed=seeds[0])
        first.fork_count = params.n - 1
        first.prompt_tensor = torch.tensor(first.token_ids, dtype=torch.int64)  # [P], sliced by each prefill chunk
        if params.prompt_logprobs is not None:
            first.prompt_logprobs = [None]
        return SequenceGroup(request_id, prompt_text, prompt_ids, params, RequestMetrics(now), [first],
                             pending_samples=samples[1:], pending_seeds=seeds[1:], max_output_tokens=max_out)

    def _encode_prompt(self, prompt: str | list[int]) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass the prompt as a list of token ids")
            ids, text = self.tokenizer.encode(prompt, bos=True), prompt
        else:
            ids, text = [int(t) for t in prompt], None
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id(s) {bad[:5]} are outside the vocabulary (size {vocab})")
        return ids, text

    def _check_fits(self, prompt_len: int, params: SamplingParams) -> int:
        """The request's resolved max_tokens; raises RequestTooLongError if it can never be served."""
        max_len = self.config.max_model_len
        assert max_len is not None
        if prompt_len >= max_len:
            raise RequestTooLongError(
                f"the prompt has {prompt_len} tokens but max_model_len is {max_len}: nothing could be generated; "
                f"shorten the prompt or raise --max-model-len"
            )
        bm = self.block_manager
        capacity = bm.num_blocks * bm.block_size
        # max_tokens=None: up to the context length, or what the whole KV cache holds if that is less.
        max_out = params.max_tokens if params.max_tokens is not None else min(max_len, capacity) - prompt_len
        if prompt_len + max_out > max_len:
            raise RequestTooLongError(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_out}) = {prompt_len + max_out} tokens exceeds "
                f"max_model_len={max_len}; lower max_tokens to at most {max_len - prompt_len}"
            )
        if bm.blocks_needed(prompt_len + max_out) > bm.num_blocks or max_out < 1:
            raise RequestTooLongError(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_out}) = {prompt_len + max_out} tokens exceeds the "
                f"whole KV cache ({capacity} tokens in {bm.num_blocks} blocks); lower max_tokens "
                f"or give the KV cache more memory"
            )
        return max_out

    def _sample_seed(self, seed: int | None, index: int) -> int:
        if seed is None:
            return self._rng.getrandbits(63)
        # Sample 0 uses the seed itself; the others a deterministic derivative (int hashing is not salted).
        if index:
            return hash((seed, index)) & ((1 << 63) - 1)
        # The sampler holds seeds in int64: an unsigned 64-bit seed keeps its bits as the signed value.
        return seed - (1 << 64) if seed >= (1 << 63) else seed

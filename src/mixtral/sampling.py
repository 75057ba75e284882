"""SamplingParams: how one request turns logits into tokens, validated on construction.

Field names and meanings follow vLLM's ``SamplingParams`` so users of either find their way. The batched
sampler that applies these settings on the device lives in ``mixtral.engine.sampler``; this module is
only the user-facing description.

The defaults below are the only place each sampling default is written: ``SamplingParams``, the HTTP protocol
(``serve/params.py``, the model card), the CLI flags and ``mixtral.LLM`` all read them from here. Temperature
0.7 is what Mistral's API uses for Mixtral.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from mixtral.guide import TokenGuide

# How many alternatives `logprobs` / `prompt_logprobs` may ask for (the top-k of the vocabulary).
MAX_LOGPROBS = 20
# Largest |bias| ``logit_bias`` takes (OpenAI's range: -100 bans a token, +100 all but forces it).
MAX_LOGIT_BIAS = 100.0

DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 1.0
DEFAULT_TOP_K = -1  # off
DEFAULT_MIN_P = 0.0  # off
DEFAULT_MAX_TOKENS = 16  # vLLM's default for the Python API; the server defaults to the rest of the context
DEFAULT_PRESENCE_PENALTY = 0.0
DEFAULT_FREQUENCY_PENALTY = 0.0
DEFAULT_REPETITION_PENALTY = 1.0  # off


@dataclass
class SamplingParams:
    """Sampling settings of one request.

    temperature 0 is greedy (exactly argmax). top_k <= 0 and top_p == 1 and min_p == 0 switch those filters
    off. ``seed`` makes a request reproducible whatever else shares its batch. ``max_tokens=None`` means
    "until the context is full". ``logprobs=k`` returns, per generated token, the logprobs of the top-k
    tokens plus the sampled one; ``prompt_logprobs=k`` does the same for each prompt token after the first.
    Logprobs are of the model's raw distribution (before temperature, penalties and filters).
    ``logit_bias`` ({token id: bias in [-100, 100]}) is added to those tokens' logits before sampling.
    ``guide`` constrains decoding (tool calls, JSON schema); with n > 1 each sample gets ``guide.copy()``.
    ``return_routing`` returns, per generated token, every MoE layer's top-k experts and weights
    (``CompletionOutput.routing_experts`` / ``routing_weights``, row i: the forward pass that sampled token i);
    ``return_prompt_routing`` the same per prompt token (``RequestOutput.prompt_routing_*``); the two are
    independent (engine/routing.py). A step holding such a request runs without CUDA graphs.
    """

    n: int = 1
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K
    min_p: float = DEFAULT_MIN_P
    seed: int | None = None
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = DEFAULT_PRESENCE_PENALTY
    frequency_penalty: float = DEFAULT_FREQUENCY_PENALTY
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    return_routing: bool = False
    return_prompt_routing: bool = False
    guide: TokenGuide | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias is not None:
            self.logit_bias = dict(self.logit_bias) or None
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} {rule}, got {getattr(self, name)!r}")

        if not _is_int(self.n) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if not self.temperature >= 0.0:
            raise bad("temperature", "must be >= 0 (0 means greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "must be an integer >= -1 (-1 or 0 switch it off)")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if self.seed is not None and (not _is_int(self.seed) or not -(1 << 63) <= self.seed < (1 << 64)):
            raise bad("seed", "must be None or an integer in [-2**63, 2**64) (a signed or unsigned 64-bit value)")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "must be an integer >= 1 or None (up to the context length)")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"SamplingParams.min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must be a non-empty string or a list of non-empty strings")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of non-negative token ids")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise bad(name, f"must be None or an integer in [0, {MAX_LOGPROBS}]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "must be in [-2, 2]")
        if self.logit_bias is not None and any(
            not _is_int(t) or t < 0 or not isinstance(b, (int, float)) or not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS
            for t, b in self.logit_bias.items()
        ):
            raise bad("logit_bias", f"must map token ids (>= 0) to biases in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise bad("repetition_penalty", "must be in (0, 2] (1 switches it off)")
        for name in ("return_routing", "return_prompt_routing"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be True or False")
        if self.guide is not None and not all(
            callable(getattr(self.guide, m, None)) for m in ("fill_bitmask", "accept_token", "is_finished", "copy")
        ):
            raise bad("guide", "must implement mixtral.guide.TokenGuide")

    # ----------------------------------------------------------------- derived flags the sampler batches on
    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def needs_full_prompt(self) -> bool:
        """Prompt logprobs and prompt routing need every prompt position computed: no prefix-cache hits."""
        return self.prompt_logprobs is not None or self.return_prompt_routing

    @property
    def effective_top_k(self) -> int:
        """top_k with both "off" spellings (-1 and 0) mapped to 0."""
        return max(self.top_k, 0)

    def clone(self) -> SamplingParams:
        """A copy with its own guide state (the guide is copied with ``guide.copy()``, not deep-copied)."""
        guide, self.guide = self.guide, None
        try:
            out = copy.deepcopy(self)
        finally:
            self.guide = guide
        out.guide = guide.copy() if guide is not None else None
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain settings (no guide), e.g. for logs and benchmark records."""
        return {k: v for k, v in self.__dict__.items() if k != "guide"}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

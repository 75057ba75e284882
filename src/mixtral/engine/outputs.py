"""What the engine hands back per request: RequestOutput with one CompletionOutput per sample.

Everything here is cumulative (text and token ids so far), as in vLLM; streaming consumers take the
difference between successive outputs. Plain dataclasses, no tensors: safe to pass between threads.

Routing (only for requests whose ``SamplingParams`` ask; None otherwise), the hook ``serve/routing.py`` reads:
``CompletionOutput.routing_experts`` int16 [T, L, k] (each layer's top-k expert ids, best first) and
``routing_weights`` float32 [T, L, k] (their weights, renormalised over the k), row i aligned with ``token_ids[i]``:
the routing of the forward pass whose logits sampled token i (row 0: the last prompt position). On
``RequestOutput``, ``prompt_routing_experts`` / ``prompt_routing_weights`` [P, L, k], row j the routing at prompt
position j (set once the whole prompt is computed). Read-only numpy views, not copied per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Per position: {token_id: logprob} for the top-k alternatives and the chosen token.
Logprobs = list[dict[int, float]]


@dataclass
class CompletionOutput:
    """One sample of a request. ``finish_reason``: "stop" (EOS, stop string/token, guide done),
    "length" (max_tokens or the context is full), "abort", "error" (the engine failed the request: see
    ``RequestOutput.error``), or None while still running. ``stop_reason``
    is the stop string or stop token id that ended it (None for EOS and the other reasons)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: Logprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    routing_experts: np.ndarray | None = None  # numpy int16 [T, L, k] with return_routing (see the module docstring)
    routing_weights: np.ndarray | None = None  # numpy float32 [T, L, k]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock times (``time.monotonic()`` seconds) of a request's life, for TTFT / ITL statistics."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    # Time at which each generated token of sample 0 was produced (ITL = successive differences).
    token_times: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float | None:
        """Time to first token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def inter_token_latencies(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


@dataclass(frozen=True)
class RequestError:
    """Why the engine failed one request while the other requests went on (``RequestOutput.error``).

    ``invalid_request``: the request's own input is at fault (its grammar hit constrained decoding's limits, a
    stop string its detokenizer cannot handle, ...): a server answers 400. False: an engine bug that only this
    request met (logged with its traceback): a server answers 500.
    """

    message: str
    invalid_request: bool


@dataclass
class RequestOutput:
    """The state of one request after an engine step. ``num_cached_tokens``: prompt tokens whose KV came
    from the prefix cache instead of being computed. ``prompt_token_ids`` is the same list in every output of
    a request (as in vLLM): read it, don't modify it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, float] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    error: RequestError | None = None  # set (with finish_reason "error") when the engine failed this request
    prompt_routing_experts: np.ndarray | None = None  # int16 [P, L, k] with return_prompt_routing (see above)
    prompt_routing_weights: np.ndarray | None = None  # numpy float32 [P, L, k]

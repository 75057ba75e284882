"""Sequence and SequenceGroup: the engine's bookkeeping for one sample and for one request.

A request (``SequenceGroup``) starts as one ``Sequence`` holding its prompt. With ``n > 1`` the prompt is
prefilled once; when its first tokens are sampled the group forks into n sequences that share the
prompt's full KV blocks (see ``BlockManager.fork``). Each Sequence tracks how many of its tokens already
have K/V in the cache (``num_computed_tokens``): the scheduler feeds it the rest, a chunk at a time.
The only tensor here is the prompt's CPU copy (``prompt_tensor``), which the model runner slices. A sequence whose
params ask for routing keeps it in ``RoutingRows`` (engine/routing.py says which row belongs to which token).
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from mixtral.engine.outputs import CompletionOutput, Logprobs, RequestError, RequestMetrics, RequestOutput
from mixtral.engine.routing import RoutingRows
from mixtral.guide import TokenGuide
from mixtral.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # the engine failed the request (its error is on the SequenceGroup)

    def __init__(self, value: str) -> None:
        # A plain attribute, not a property: the engine reads it for every sequence of every step.
        self.finished = value not in ("waiting", "running")

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.finished else None


_seq_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One sample: prompt + generated tokens, its KV blocks and its progress through them."""

    request_id: str
    index: int  # which of the request's n samples
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    arrival_time: float
    seed: int = 0  # this sample's noise seed (the request's seed, or one the engine drew)
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # Bumped by the block manager each time it drops this table (finish, preemption): tells cached copies
    # of the table (the model runner's BlockTables) to rewrite it.
    block_table_epoch: int = 0
    # Block hashes of this sequence's full blocks, computed lazily (prefix caching).
    block_hashes: list[int] = field(default_factory=list)
    # Leading blocks of block_table already offered to the prefix cache (cache_full_blocks resumes here).
    num_published_blocks: int = 0
    # Output side.
    text: str = ""
    # Characters at the end of ``text`` not shown yet: they may be the start of a stop string.
    text_holdback: int = 0
    logprobs: Logprobs | None = None
    cumulative_logprob: float = 0.0
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    # Extra samples (n - 1) this sequence forks into once its prompt is computed.
    fork_count: int = 0
    # Per prompt token: {token_id: logprob} (None for the first token); filled while the prompt is computed.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    detokenizer: object | None = None  # mixtral.engine.detokenize.Detokenizer, set by the engine
    # The prompt as an int64 CPU tensor, built once at admission: a 2048-token prefill chunk then slices it
    # instead of converting 2048 Python ints while the GPU waits for the step (~80 us).
    prompt_tensor: torch.Tensor | None = field(default=None, repr=False, compare=False)
    # Routing rows (engine/routing.py), when the params ask: of the generated tokens (row i: the pass that sampled
    # token i), and of the prompt (row j: prompt position j; recorded by a request's first sequence only).
    routing: RoutingRows | None = field(default=None, repr=False, compare=False)
    prompt_routing: RoutingRows | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.params.return_routing:
            self.routing = RoutingRows()
        if self.params.return_prompt_routing and self.index == 0:
            self.prompt_routing = RoutingRows()

    def new_token_ids(self, start: int, n: int) -> torch.Tensor:
        """Token ids start .. start + n - 1 as an int64 CPU tensor (a view of ``prompt_tensor`` inside the
        prompt)."""
        if self.prompt_tensor is not None and start + n <= self.num_prompt_tokens:
            return self.prompt_tensor[start:start + n]
        return torch.tensor(self.token_ids[start:start + n], dtype=torch.int64)

    @property
    def guide(self) -> TokenGuide | None:
        return self.params.guide

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def is_prefill(self) -> bool:
        """True while more than the last token lacks K/V (the prompt, or a recompute after preemption)."""
        return self.num_tokens - self.num_computed_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_token(self, token_id: int, logprobs: dict[int, float] | None, logprob: float) -> None:
        self.token_ids.append(token_id)
        self.cumulative_logprob += logprob
        if logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.append(logprobs)

    def reset_for_recompute(self) -> None:
        """Preemption by recompute: forget the KV (the block manager frees it), keep the tokens."""
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_table = []
        self.num_preemptions += 1

    def completion(self) -> CompletionOutput:
        experts, weights = self.routing.arrays() if self.routing is not None else (None, None)
        return CompletionOutput(
            index=self.index,
            text=self.text[:len(self.text) - self.text_holdback] if self.text_holdback else self.text,
            token_ids=self.token_ids[self.num_prompt_tokens:],  # a slice is already a copy
            cumulative_logprob=self.cumulative_logprob if self.num_output_tokens else None,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            finish_reason=self.status.finish_reason,
            stop_reason=self.stop_reason,
            routing_experts=experts,
            routing_weights=weights,
        )


@dataclass(eq=False)
class SequenceGroup:
    """One request: its prompt, its sampling params and its n samples."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    seqs: list[Sequence]
    # Guides (and params) for samples 1..n-1, prepared at admission so they start in the prompt's state.
    pending_samples: list[SamplingParams] = field(default_factory=list)
    pending_seeds: list[int] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] | None = None
    num_cached_tokens: int = 0
    max_output_tokens: int = 0  # max_tokens resolved against the context length
    error: RequestError | None = None  # why the engine failed this request (its sequences: FINISHED_ERROR)

    @property
    def needs_fork(self) -> bool:
        return bool(self.pending_samples)

    @property
    def is_finished(self) -> bool:
        if self.pending_samples:
            return False
        if len(self.seqs) == 1:  # most requests: no generator (read for every request a step touches)
            return self.seqs[0].status.finished
        return all(s.status.finished for s in self.seqs)

    def to_output(self) -> RequestOutput:
        prompt_rows = self.seqs[0].prompt_routing
        experts = weights = None
        if prompt_rows is not None and prompt_rows.num_rows == len(self.prompt_token_ids):  # complete
            experts, weights = prompt_rows.arrays()
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            # Shared, not copied: a step's outputs would otherwise copy every long prompt again (O(prompt) host
            # work per request per step). The engine never changes it after admission.
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=list(self.prompt_logprobs) if self.prompt_logprobs is not None else None,
            outputs=([self.seqs[0].completion()] if len(self.seqs) == 1
                     else [s.completion() for s in sorted(self.seqs, key=lambda s: s.index)]),
            finished=self.is_finished,
            num_cached_tokens=self.num_cached_tokens,
            metrics=self.metrics,
            error=self.error,
            prompt_routing_experts=experts,
            prompt_routing_weights=weights,
        )

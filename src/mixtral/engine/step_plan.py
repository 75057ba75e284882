"""Planning a step: what the model runner computes and samples, and the step launched ahead.

``StepPlanner.plan`` turns the scheduler's choice into a ``StepPlan`` (which rows to sample, whose prompt
logprobs to keep) and the targets each sampled row goes to; ``plan_ahead`` decides whether the next decode step
can be launched before this one's tokens reach the host (async scheduling) and prepares it. ``GuideMasks`` fills
the guided rows' bitmasks on worker threads while the forward pass runs; a guide that raises marks its row
failed (the row is sampled unconstrained and its token dropped) instead of failing the step, so one request's
grammar can never stop the others. Applying a launched step is ``step_apply``'s job; launching it is the
engine's (the only place that calls the model runner).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from mixtral.engine.block_manager import BlockManager
from mixtral.engine.config import EngineConfig
from mixtral.engine.model_runner import LaunchedStep, StepPlan
from mixtral.engine.requests import RequestTable
from mixtral.engine.sampler import SampleRow
from mixtral.engine.scheduler import ScheduledSequence, Scheduler, SchedulerOutput
from mixtral.engine.sequence import Sequence
from mixtral.guide import bitmask_words

# targets[i] for sampled row i: (sequence, None) for an ordinary row, (parent, k) for the first token of the
# request's k-th pending sample (n > 1).
Targets = list[tuple[Sequence, int | None]]


@dataclass
class Inflight:
    """A launched step whose samples have not been applied yet."""

    plan: StepPlan
    targets: Targets
    launched: LaunchedStep
    # Row -> the exception its guide raised while filling the row's mask (that row's request fails).
    guide_errors: dict[int, BaseException] = field(default_factory=dict)

    def is_stale(self) -> bool:
        """Every sequence it computes for has finished (or was aborted) since: its results are not wanted."""
        return all(s.seq.is_finished for s in self.plan.scheduled)


@dataclass
class AheadStep:
    """The decode step launched before the previous one's samples are on the host (see ``plan_ahead``)."""

    plan: StepPlan
    seqs: list[Sequence]
    input_rows: list[int] | None  # rows of the previous step's sampled ids that feed this step (None: all)

    def launched(self, launched: LaunchedStep) -> Inflight:
        for seq in self.seqs:
            seq.num_computed_tokens += 1  # its K/V is being computed; the token itself arrives with the step before
        return Inflight(self.plan, [(seq, None) for seq in self.seqs], launched)


class GuideMasks:
    """The bitmask [R, W] of one step's rows, its guided rows filled on worker threads.

    ``wait`` (called by the model runner after it launched the forward pass) returns the mask; a guide that
    raised leaves its row all-allowed and its exception in ``errors``, so the step goes on for every other row.
    """

    def __init__(self, pool: ThreadPoolExecutor, rows: list[SampleRow], guided: list[int], vocab_size: int,
                 pin_memory: bool) -> None:
        # All allowed for unguided rows; pinned on CUDA so its copy to the device is asynchronous.
        self.bitmask = torch.full((len(rows), bitmask_words(vocab_size)), -1, dtype=torch.int32,
                                  pin_memory=pin_memory)  # [R, W]
        self.errors: dict[int, BaseException] = {}
        self._futures: list[tuple[int, Future[None]]] = [
            (i, pool.submit(rows[i].params.guide.fill_bitmask, self.bitmask[i]))  # type: ignore[union-attr]
            for i in guided
        ]

    def wait(self) -> torch.Tensor:
        for i, future in self._futures:
            exc = future.exception()
            if exc is not None:
                self.errors[i] = exc
                self.bitmask[i].fill_(-1)  # sampled unconstrained; the token is dropped with the request
        return self.bitmask


class StepPlanner:
    def __init__(self, config: EngineConfig, scheduler: Scheduler, block_manager: BlockManager,
                 requests: RequestTable, vocab_size: int, device: torch.device) -> None:
        self.config = config
        self.scheduler = scheduler
        self.block_manager = block_manager
        self.requests = requests
        self.vocab_size = vocab_size
        self.device = device
        self._guide_pool: ThreadPoolExecutor | None = None

    def plan(self, sched: SchedulerOutput) -> tuple[StepPlan, Targets]:
        """Sample rows for every sequence that reaches its last token; fork rows for n > 1 prompts."""
        rows: list[SampleRow] = []
        owner: list[int] = []
        targets: Targets = []
        prompt_lp: list[int | None] = []
        for j, s in enumerate(sched.scheduled):
            seq = s.seq
            want_plp = seq.prompt_logprobs is not None and len(seq.prompt_logprobs) < seq.num_prompt_tokens
            prompt_lp.append(seq.params.prompt_logprobs if want_plp else None)
            if not s.samples:
                continue
            prompt_ids = seq.token_ids[:seq.num_prompt_tokens] if seq.params.has_penalties else []
            output_ids = seq.output_token_ids if seq.params.has_penalties else []
            rows.append(SampleRow(seq.params, seq.seed, seq.num_output_tokens, prompt_ids, output_ids))
            owner.append(j)
            targets.append((seq, None))
            if seq.fork_count:
                group = self.requests.group(seq)
                for k, (p, seed) in enumerate(zip(group.pending_samples, group.pending_seeds, strict=True)):
                    prompt_ids = seq.token_ids[:seq.num_prompt_tokens] if p.has_penalties else []
                    rows.append(SampleRow(p, seed, 0, prompt_ids, []))
                    owner.append(j)
                    targets.append((seq, k))
        return StepPlan(sched.scheduled, rows, owner, prompt_lp), targets

    def guide_masks(self, rows: list[SampleRow]) -> GuideMasks | None:
        """Start filling guided rows' bitmasks on worker threads (overlapping the forward pass)."""
        guided = [i for i, r in enumerate(rows) if r.params.guide is not None]
        if not guided:
            return None
        if self._guide_pool is None:
            self._guide_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="mixtral-guide")
        return GuideMasks(self._guide_pool, rows, guided, self.vocab_size, self.device.type == "cuda")

    def plan_ahead(self, current: Inflight) -> AheadStep | None:
        """The decode step that follows ``current`` for its sequences, to launch before ``current``'s samples
        are known on the host; None when that step would need them (or a new admission should come first).

        A waiting request that has a seat goes first (the scheduler admits it); behind a full batch it waits
        either way, so the overlap goes on. Each sequence's input is the token ``current`` samples for it, read
        from the device. Sequences certain to finish at ``current`` (length limits) are left out; ones that stop
        on a token are not known yet and compute one extra token that the apply step drops. Allocates the
        sequences' slots for the new token.
        """
        if self.scheduler.can_admit() or current.launched.token_ids is None:
            return None
        plan = current.plan
        if len(plan.rows) != len(plan.scheduled) or any(k is not None for _, k in current.targets):
            return None  # a prefill chunk that samples nothing, or n > 1 forking: the scheduler decides
        max_len = self.config.max_model_len
        assert max_len is not None
        bm = self.block_manager
        bs = bm.block_size
        group_of = self.requests.group_of
        # One pass over the batch (this runs every decode step for every running sequence).
        keep: list[int] = []
        seqs: list[Sequence] = []
        new_blocks = 0
        for i, s in enumerate(plan.scheduled):
            seq = s.seq
            params = seq.params
            if params.guide is not None or params.has_penalties:
                return None  # both read the previous token on the host
            if seq.status.finished:
                continue
            # After ``current`` the sequence holds num_tokens + 1 tokens.
            num_tokens = len(seq.token_ids) + 1
            if (num_tokens - seq.num_prompt_tokens >= group_of[seq.seq_id].max_output_tokens
                    or num_tokens >= max_len):
                continue
            keep.append(i)
            seqs.append(seq)
            new_blocks += -(-num_tokens // bs) - len(seq.block_table)
        if not keep:
            return None
        if new_blocks > bm.num_free_blocks:
            return None  # memory is short: let the scheduler preempt
        scheduled = []
        rows = []
        for seq in seqs:
            num_tokens = len(seq.token_ids) + 1
            bm.allocate_slots(seq, num_tokens)
            scheduled.append(ScheduledSequence(seq, 1))
            rows.append(SampleRow(seq.params, seq.seed, num_tokens - seq.num_prompt_tokens))
        ahead = StepPlan(scheduled, rows, list(range(len(seqs))), [None] * len(seqs))
        return AheadStep(ahead, seqs, keep if len(keep) != len(plan.rows) else None)

    def shutdown(self) -> None:
        if self._guide_pool is not None:
            self._guide_pool.shutdown(wait=False)
            self._guide_pool = None


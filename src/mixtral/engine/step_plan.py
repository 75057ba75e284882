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
from mixtral.engine.routing import capture_start
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
    """The step launched before the previous one's samples are on the host (see ``plan_ahead``)."""

    plan: StepPlan
    # Per scheduled sequence: the row of the previous step's sampled ids that is its input token, or -1 where its
    # tokens are on the host (a prompt's chunk). None: every sequence decodes, fed by every row in order.
    input_rows: list[int] | None
    # Admitted by this step: prompt tokens found in the prefix cache, per sequence (SchedulerOutput's).
    num_cached_tokens: dict[int, int] = field(default_factory=dict)
    num_prompt_tokens: int = 0  # prompt tokens it computes (the engine's counter)

    def launched(self, launched: LaunchedStep) -> Inflight:
        for s in self.plan.scheduled:
            # Their K/V is being computed; a decoding sequence's token arrives with the step before.
            s.seq.num_computed_tokens += s.num_new_tokens
        targets: Targets = [(self.plan.scheduled[j].seq, None) for j in self.plan.row_owner]
        return Inflight(self.plan, targets, launched)


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


def _plain(seq: Sequence) -> bool:
    """Whether a waiting sequence can be admitted into a step launched ahead: nothing about it needs the host
    between its steps (no guide, penalties, prompt logprobs, n > 1 forks or routing capture)."""
    p = seq.params
    return (p.guide is None and not p.has_penalties and seq.prompt_logprobs is None and not seq.fork_count
            and seq.routing is None and seq.prompt_routing is None)


class StepPlanner:
    def __init__(self, config: EngineConfig, scheduler: Scheduler, block_manager: BlockManager,
                 requests: RequestTable, vocab_size: int, device: torch.device, mixed_ahead: bool = False) -> None:
        """``mixed_ahead``: the model runner takes a step launched ahead that mixes sequences fed by the previous
        step's sampled ids with host-fed prompt chunks (``ModelRunner.launch``'s ``input_rows`` with -1s)."""
        self.mixed_ahead = mixed_ahead
        self.config = config
        self.scheduler = scheduler
        self.block_manager = block_manager
        self.requests = requests
        self.vocab_size = vocab_size
        self.device = device
        self._guide_pool: ThreadPoolExecutor | None = None

    def plan(self, sched: SchedulerOutput) -> tuple[StepPlan, Targets]:
        """Sample rows for every sequence that reaches its last token; fork rows for n > 1 prompts; the routing
        rows to keep for sequences that asked (engine/routing.py)."""
        rows: list[SampleRow] = []
        owner: list[int] = []
        targets: Targets = []
        prompt_lp: list[int | None] = []
        routing: list[int | None] | None = None
        for j, s in enumerate(sched.scheduled):
            seq = s.seq
            if seq.routing is not None or seq.prompt_routing is not None:
                first = capture_start(s)
                if first is not None:
                    if routing is None:
                        routing = [None] * len(sched.scheduled)
                    routing[j] = first
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
        return StepPlan(sched.scheduled, rows, owner, prompt_lp, routing), targets

    def guide_masks(self, rows: list[SampleRow]) -> GuideMasks | None:
        """Start filling guided rows' bitmasks on worker threads (overlapping the forward pass)."""
        guided = [i for i, r in enumerate(rows) if r.params.guide is not None]
        if not guided:
            return None
        if self._guide_pool is None:
            self._guide_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="mixtral-guide")
        return GuideMasks(self._guide_pool, rows, guided, self.vocab_size, self.device.type == "cuda")

    def plan_ahead(self, current: Inflight) -> AheadStep | None:
        """The step that follows ``current``, planned and launched before ``current``'s samples reach the host;
        None when it would need them (the scheduler then plans the next step once they are applied).

        Each sequence that samples at ``current`` decodes, its input the token ``current`` samples for it, read
        from the device. Sequences certain to finish at ``current`` (length limits) are left out; ones that stop
        on a token are not known yet and compute one extra token that the apply step drops. With a runner that
        takes host-fed tokens in such a step (``mixed_ahead``), a prompt ``current`` computed part of gets its next
        chunk, and waiting requests are admitted in the budget left (``Scheduler.admit_ahead``), so admissions
        keep the device busy too; otherwise a step with either goes back to the scheduler. Guides, penalties and
        n > 1 forks read sampled tokens on the host: any in ``current`` (or at the head of the queue) makes it
        the scheduler's step. Allocates the slots of every sequence it schedules.
        """
        plan = current.plan
        if any(k is not None for _, k in current.targets):
            return None  # n > 1 forking: the scheduler decides
        admit = self.scheduler.can_admit()
        if admit and not (self.mixed_ahead and _plain(self.scheduler.waiting[0])):
            return None  # the head of the queue needs the scheduler's step
        max_len = self.config.max_model_len
        assert max_len is not None
        bm = self.block_manager
        bs = bm.block_size
        group_of = self.requests.group_of
        owner = plan.row_owner
        # Scheduled index -> the row it samples; None when they are the same (every sequence sampled, in order).
        row_of = None if len(owner) == len(plan.scheduled) and (not owner or owner[-1] == len(owner) - 1) else {
            j: i for i, j in enumerate(owner)}
        # One pass over the batch (this runs every decode step for every running sequence): who goes on, and how.
        going: list[tuple[Sequence, int]] = []  # (sequence, the row feeding it or -1: a prompt chunk from the host)
        num_unfinished = num_decoding = 0
        for j, s in enumerate(plan.scheduled):
            seq = s.seq
            params = seq.params
            if params.guide is not None or params.has_penalties:
                return None  # both read the previous token on the host
            if seq.status.finished:
                continue
            num_unfinished += 1
            row = j if row_of is None else row_of.get(j)
            if row is None:
                # A prompt's chunk that samples nothing: the next chunk's tokens are on the host.
                if not self.mixed_ahead or not _plain(seq):
                    return None
                going.append((seq, -1))
                continue
            # After ``current`` the sequence holds num_tokens + 1 tokens.
            num_tokens = len(seq.token_ids) + 1
            if (num_tokens - seq.num_prompt_tokens < group_of[seq.seq_id].max_output_tokens
                    and num_tokens < max_len):
                going.append((seq, row))
                num_decoding += 1
        if num_unfinished != len(self.scheduler.running):
            return None  # a running sequence ``current`` left out (the budget ran out): the scheduler's turn
        # Decoding sequences first take one token each; prompt chunks share what is left, in order.
        budget = self.config.max_num_batched_tokens - num_decoding
        scheduled: list[ScheduledSequence] = []
        feed: list[int] = []
        rows: list[SampleRow] = []
        row_owner: list[int] = []
        new_blocks = 0
        for seq, row in going:
            if row >= 0:
                num_tokens = len(seq.token_ids) + 1
                row_owner.append(len(scheduled))
                rows.append(SampleRow(seq.params, seq.seed, num_tokens - seq.num_prompt_tokens))
                scheduled.append(ScheduledSequence(seq, 1))
            else:
                num_new = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
                if num_new < 1:
                    return None
                budget -= num_new
                num_tokens = seq.num_computed_tokens + num_new
                scheduled.append(ScheduledSequence(seq, num_new))
            feed.append(row)
            new_blocks += -(-num_tokens // bs) - len(seq.block_table)
        if new_blocks > bm.num_free_blocks:
            return None  # memory is short: let the scheduler preempt
        for s in scheduled:
            bm.allocate_slots(s.seq, s.seq.num_computed_tokens + s.num_new_tokens)
        admitted = None
        if admit and budget > 0:
            # The blocks of current's prompts are computed before this step runs (one stream, in order): offer
            # them to the prefix cache now, as applying current would before a scheduled step.
            bm.cache_full_blocks_of(s.seq for s in plan.scheduled if not s.seq.status.finished)
            admitted = self.scheduler.admit_ahead(budget, _plain)
            scheduled += admitted.scheduled
            feed += [-1] * len(admitted.scheduled)
        if not scheduled:
            return None
        # The host-fed sequences: prompt tokens to count, and a row for each chunk that reaches its prompt's end.
        num_prompt_tokens = 0
        for j, (s, row) in enumerate(zip(scheduled, feed, strict=True)):
            if row >= 0:
                continue
            seq = s.seq
            if seq.is_prefill:
                num_prompt_tokens += s.num_new_tokens
            if s.samples:
                rows.append(SampleRow(seq.params, seq.seed, seq.num_output_tokens))
                row_owner.append(j)
        routing = None
        if plan.routing is not None:  # without routing in ``current`` none of its sequences asked
            # A decoding sequence with return_routing keeps its one row (the position it feeds); host-fed ones
            # never ask (``_plain``).
            routing = [s.seq.num_computed_tokens if row >= 0 and s.seq.routing is not None else None
                       for s, row in zip(scheduled, feed, strict=True)]
            if all(r is None for r in routing):
                routing = None
        ahead = StepPlan(scheduled, rows, row_owner, [None] * len(scheduled), routing)
        in_order = len(feed) == len(plan.rows) and feed == list(range(len(feed)))
        return AheadStep(ahead, None if in_order else feed,
                         admitted.num_cached_tokens if admitted is not None else {}, num_prompt_tokens)

    def shutdown(self) -> None:
        if self._guide_pool is not None:
            self._guide_pool.shutdown(wait=False)
            self._guide_pool = None


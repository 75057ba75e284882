"""Scheduler: which sequences run in the next forward pass, and with how many tokens each.

Continuous batching with chunked prefill under a per-step token budget (``max_num_batched_tokens``):

1. Running sequences first, oldest first: each gets the tokens it still lacks K/V for (1 when decoding,
   a chunk of its prompt while prefilling), within the budget. When the KV cache has no block for one,
   the newest running sequence is preempted (its blocks freed; it is recomputed later), then the next
   newest, until the older one fits: the oldest requests always progress, so none starves.
2. Then waiting sequences, strictly first-come first-served (a preempted sequence goes back to the front):
   each takes its longest cached prefix from the prefix cache and as much of the rest as the budget allows.
   Admission stops at the first sequence that does not fit, so later arrivals never overtake it.

The scheduler moves sequences between its queues and the block manager; the engine applies the results.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from mixtral.engine.block_manager import BlockManager
from mixtral.engine.config import EngineConfig
from mixtral.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSequence:
    """``seq`` feeds ``token_ids[num_computed_tokens : num_computed_tokens + num_new_tokens]`` this step."""

    seq: Sequence
    num_new_tokens: int

    @property
    def start(self) -> int:
        return self.seq.num_computed_tokens

    @property
    def samples(self) -> bool:
        """This step reaches the sequence's last token, so its logits give the next token."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # Per newly admitted sequence: prompt tokens found in the prefix cache.
    num_cached_tokens: dict[int, int] = field(default_factory=dict)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running_after(self, parent: Sequence, children: list[Sequence]) -> None:
        """Forked samples join the running batch right behind their parent, keeping its priority."""
        i = self.running.index(parent) + 1
        for child in children:
            child.status = SequenceStatus.RUNNING
        self.running[i:i] = children

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def can_admit(self) -> bool:
        """Whether the head of the waiting queue has a seat in the running batch (memory not considered): the
        engine's async scheduling hands the next step to ``schedule`` only then, so a full batch with a queue
        behind it keeps overlapping."""
        if not self.waiting:
            return False
        if len(self.running) + 1 + self.waiting[0].fork_count > self.config.max_num_seqs:
            return False  # a full batch (the usual case while requests queue): no need to count forks
        seats = self.config.max_num_seqs - sum(1 + s.fork_count for s in self.running)
        return 1 + self.waiting[0].fork_count <= seats

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Take ``seq`` out of the queues and free its blocks."""
        self.finish_all([(seq, status)])

    def finish_all(self, finishing: list[tuple[Sequence, SequenceStatus]]) -> None:
        """``finish`` for each (sequence, status): the running list is filtered once, not searched once per
        sequence (a batch admitted together finishes together: k removals from n running cost k * n)."""
        leaving: set[int] = set()
        for seq, status in finishing:
            if seq.status == SequenceStatus.RUNNING:
                leaving.add(seq.seq_id)
            elif seq.status == SequenceStatus.WAITING:
                self.waiting.remove(seq)
            self.block_manager.free(seq)
            seq.status = status
        if len(leaving) == 1:
            self.running.remove(next(s for s, _ in finishing if s.seq_id in leaving))
        elif leaving:
            self.running[:] = [s for s in self.running if s.seq_id not in leaving]

    # ----------------------------------------------------------------- the policy
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            target = seq.num_computed_tokens + num_new
            while not bm.can_allocate(seq, target):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break  # it preempted itself: everything after it is gone too
            bm.allocate_slots(seq, target)
            out.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
            i += 1

        if out.preempted:
            return out  # memory is short: admit nobody new this step
        self._admit(out, budget)
        return out

    def admit_ahead(self, budget: int, accept: Callable[[Sequence], bool]) -> SchedulerOutput:
        """Admit waiting sequences into a step launched ahead (the engine's async scheduling) after its running
        sequences took their share of the budget and blocks; the rules are ``schedule``'s (first come, first
        served, seats, memory, ``budget`` tokens), and admission also stops at the first sequence ``accept``
        refuses: the step launched ahead cannot take it, the next scheduled step will."""
        out = SchedulerOutput()
        self._admit(out, budget, accept)
        return out

    def _admit(self, out: SchedulerOutput, budget: int, accept: Callable[[Sequence], bool] | None = None) -> None:
        bm = self.block_manager
        # Running prompts that will fork into n samples hold seats for all of them.
        seats = self.config.max_num_seqs - sum(1 + s.fork_count for s in self.running)
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if 1 + seq.fork_count > seats or (accept is not None and not accept(seq)):
                break
            # Prompt logprobs (and prompt routing) need every prompt position computed: no cache hits for them.
            use_cache = not seq.params.needs_full_prompt
            cached = bm.find_cached_prefix(seq) if use_cache else []
            num_cached = len(cached) * bm.block_size
            num_new = min(seq.num_tokens - num_cached, budget)
            if not bm.can_allocate(seq, num_cached + num_new, cached):
                break
            bm.allocate_slots(seq, num_cached + num_new, cached)
            if seq.num_preemptions == 0:
                bm.record_prefix_lookup(seq.num_tokens, num_cached)
                out.num_cached_tokens[seq.seq_id] = num_cached
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seats -= 1 + seq.fork_count
            out.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new

    def _preempt(self, seq: Sequence) -> None:
        """Preemption by recompute: free the KV; the sequence re-enters at the front of the waiting queue."""
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Mark the scheduled tokens as computed (the engine publishes full blocks once the step's tokens are
        applied: ``StepApplier.apply``)."""
        for s in out.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens

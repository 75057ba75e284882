"""RequestTable: the engine's live requests, by request id and by sequence id, and its running totals.

Admission adds a request's ``SequenceGroup``; the step looks groups up by sequence and removes the finished
ones; abort removes them early. Every piece of the engine that touches requests goes through this one table,
so a request is never half-registered. Single-threaded, like the engine that owns it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixtral.engine.sequence import Sequence, SequenceGroup


@dataclass
class EngineCounters:
    """Totals since the engine started (what ``EngineStats`` reports)."""

    num_steps: int = 0
    num_prompt_tokens: int = 0  # tokens computed in prefill (chunks and recomputes included)
    num_generation_tokens: int = 0  # tokens sampled
    num_finished: int = 0


class RequestTable:
    def __init__(self) -> None:
        self.groups: dict[str, SequenceGroup] = {}
        self.group_of: dict[int, SequenceGroup] = {}  # seq_id -> its request
        self.counters = EngineCounters()

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.groups

    def __len__(self) -> int:
        return len(self.groups)

    def add(self, group: SequenceGroup) -> None:
        self.groups[group.request_id] = group
        for seq in group.seqs:
            self.group_of[seq.seq_id] = group

    def add_seq(self, seq: Sequence, group: SequenceGroup) -> None:
        """A sample forked from the request's first sequence."""
        self.group_of[seq.seq_id] = group

    def group(self, seq: Sequence) -> SequenceGroup:
        return self.group_of[seq.seq_id]

    def remove(self, group: SequenceGroup, now: float) -> None:
        """Forget a finished (or aborted) request and count it."""
        self.groups.pop(group.request_id, None)
        for seq in group.seqs:
            self.group_of.pop(seq.seq_id, None)
        group.metrics.finished_time = now
        self.counters.num_finished += 1

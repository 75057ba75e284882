"""Applying a launched step: sampled tokens -> sequences, forks, stop checks, and the step's RequestOutputs.

Per-request failures stay per request. An exception raised for one request while its step is applied (its
guide filling the mask or accepting the token, its detokenizer, the stop checks, creating its n > 1 samples)
fails that request alone: its sequences finish with ``FINISHED_ERROR``, their KV blocks are freed, and its last
output carries a ``RequestError`` (``invalid_request`` for a ``ValueError``, such as a grammar past its limits;
otherwise an internal error, logged with its traceback). Every other request of the step goes on. An exception
outside any one request's work is an engine bug and propagates.

Routing (engine/routing.py): the prompt rows a step captured are appended to the sequence's ``prompt_routing`` in
position order, once; each sampled token appends the last captured row of its sequence's chunk, with the token.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from mixtral.engine.block_manager import BlockManager
from mixtral.engine.model_runner import StepPlan
from mixtral.engine.output_processor import OutputProcessor
from mixtral.engine.outputs import RequestError, RequestOutput
from mixtral.engine.requests import RequestTable
from mixtral.engine.routing import RoutingSpan
from mixtral.engine.sampler import SamplerOutput
from mixtral.engine.scheduler import Scheduler
from mixtral.engine.sequence import Sequence, SequenceGroup, SequenceStatus
from mixtral.engine.step_plan import Inflight, Targets

logger = logging.getLogger(__name__)


def request_error(exc: BaseException, stage: str, request_id: str) -> RequestError:
    """What the caller of a failed request is told; internal errors are logged with their traceback."""
    if isinstance(exc, ValueError):  # the request's own input (a GuideError is one)
        logger.warning("request %s failed while %s: %s", request_id, stage, exc)
        return RequestError(f"the request failed while {stage}: {exc}", invalid_request=True)
    logger.error("request %s failed while %s (the other requests go on)", request_id, stage, exc_info=exc)
    return RequestError(f"internal error while {stage}: {type(exc).__name__}: {exc}", invalid_request=False)


class StepApplier:
    def __init__(self, scheduler: Scheduler, block_manager: BlockManager, output_processor: OutputProcessor,
                 requests: RequestTable, release: Callable[[int], None]) -> None:
        self.scheduler = scheduler
        self.block_manager = block_manager
        self.output_processor = output_processor
        self.requests = requests
        self._release = release  # the model runner's: drop a finished sequence's cached block-table row

    def apply(self, step: Inflight, finished_only: bool) -> list[RequestOutput]:
        """Wait for ``step``'s samples, apply them and build the outputs of the requests they touched."""
        plan, targets = step.plan, step.targets
        result = step.launched.result()
        touched: dict[str, SequenceGroup] = {}
        for i, exc in step.guide_errors.items():
            seq = targets[i][0]
            if not seq.is_finished:
                group = self.requests.group(seq)
                self.fail_request(group, exc, "computing the tokens its grammar allows")
                touched[group.request_id] = group
        for j, entries in result.prompt_logprobs.items():
            seq = plan.scheduled[j].seq
            for pos, entry in sorted(entries.items()):
                if seq.prompt_logprobs is not None and pos == len(seq.prompt_logprobs):
                    seq.prompt_logprobs.append(entry)
        if result.routing:
            self._apply_prompt_routing(plan, result.routing, touched)
        if result.sampled is not None:
            self._apply_samples(plan, targets, result.sampled, result.routing, touched)
        self._publish_blocks(plan)
        return self._build_outputs(touched, finished_only)

    def _publish_blocks(self, plan: StepPlan) -> None:
        # Publish blocks now full and computed; with a step launched ahead, their last token has just arrived
        # (the block manager hashes known tokens only).
        self.block_manager.cache_full_blocks_of(s.seq for s in plan.scheduled if not s.seq.status.finished)

    def _build_outputs(self, touched: dict[str, SequenceGroup], finished_only: bool) -> list[RequestOutput]:
        """The RequestOutputs of the step's requests (only the finished ones with ``finished_only``); finished
        requests leave the table."""
        outputs = []
        now = time.monotonic()
        for group in touched.values():
            if group.prompt_logprobs is None and group.seqs[0].prompt_logprobs is not None:
                group.prompt_logprobs = group.seqs[0].prompt_logprobs
            finished = group.is_finished
            if finished:
                self.requests.remove(group, now)
            if finished or not finished_only:
                outputs.append(group.to_output())
        return outputs

    def _apply_prompt_routing(self, plan: StepPlan, routing: dict[int, RoutingSpan],
                              touched: dict[str, SequenceGroup]) -> None:
        """Append the captured prompt positions not recorded yet (a recompute's chunks bring none)."""
        for j, span in routing.items():
            seq = plan.scheduled[j].seq
            rows = seq.prompt_routing
            if rows is None or seq.is_finished:
                continue
            stop = min(span.end, seq.num_prompt_tokens)
            if stop <= rows.num_rows:
                continue
            if span.first > rows.num_rows:  # positions never captured: would misalign every later row
                group = self.requests.group(seq)
                self.fail_request(group, RuntimeError(
                    f"prompt routing of positions {rows.num_rows}..{span.first - 1} was never captured"),
                    "recording its prompt routing")
                touched[group.request_id] = group
                continue
            lo = rows.num_rows - span.first
            hi = stop - span.first
            rows.append(span.experts[lo:hi], span.weights[lo:hi])

    def _apply_samples(self, plan: StepPlan, targets: Targets, sampled: SamplerOutput,
                       routing: dict[int, RoutingSpan] | None, touched: dict[str, SequenceGroup]) -> None:
        now = time.monotonic()
        group_of = self.requests.group_of
        token_ids, top_logprobs, logprobs = sampled.token_ids, sampled.top_logprobs, sampled.logprobs
        forked: dict[int, tuple[Sequence, list[Sequence]]] = {}  # parent seq_id -> (parent, new samples)
        seqs: list[tuple[int, Sequence]] = []
        failed: dict[str, tuple[SequenceGroup, Exception, str]] = {}
        for i, (seq, fork_k) in enumerate(targets):
            if seq.status.finished:
                continue  # finished (or aborted) after this step was launched: its token is not wanted
            group = group_of[seq.seq_id]
            if failed and group.request_id in failed:
                continue
            if fork_k is not None:
                try:
                    child = self._fork(seq, group, fork_k)
                except Exception as exc:
                    failed[group.request_id] = (group, exc, "starting its samples")
                    continue
                forked.setdefault(seq.seq_id, (seq, []))[1].append(child)
                seq = child
            if seq.routing is not None:
                # The token's routing row: the last captured row of its sequence's chunk (whose logits it came from).
                span = routing.get(plan.row_owner[i]) if routing is not None else None
                if span is None:
                    failed[group.request_id] = (group, RuntimeError("the step captured no routing for its "
                                                                    "sampled token"), "recording its routing")
                    continue
                seq.routing.append(span.experts[-1:], span.weights[-1:])
            seq.append_token(token_ids[i], top_logprobs[i], logprobs[i])
            seqs.append((i, seq))
            if seq.index == 0:
                metrics = group.metrics
                if metrics.first_token_time is None:
                    metrics.first_token_time = now
                metrics.token_times.append(now)
                metrics.last_token_time = now
            touched[group.request_id] = group
        self.requests.counters.num_generation_tokens += len(seqs)
        for parent, kids in forked.values():
            group = self.requests.group(parent)
            parent.fork_count = 0
            group.pending_samples = []
            group.pending_seeds = []
            self.scheduler.add_running_after(parent, kids)
        # Stop checks after forking, so a sample that finishes at once is freed like any other.
        self._check_stops(seqs, sampled, failed)
        for group, exc, stage in failed.values():
            self.fail_request(group, exc, stage)
            touched[group.request_id] = group

    def _check_stops(self, seqs: list[tuple[int, Sequence]], sampled: SamplerOutput,
                     failed: dict[str, tuple[SequenceGroup, Exception, str]]) -> None:
        """Detokenize each new token and finish the sequences it stops (together: many finish at once when a
        batch admitted together reaches max_tokens); a request that raises goes to ``failed``."""
        group_of = self.requests.group_of
        process_token = self.output_processor.process_token
        token_ids = sampled.token_ids
        finishing: list[tuple[Sequence, SequenceStatus]] = []
        for i, seq in seqs:
            group = group_of[seq.seq_id]
            if failed and group.request_id in failed:
                continue
            try:
                status = process_token(seq, group, token_ids[i])
            except Exception as exc:
                failed[group.request_id] = (group, exc, "applying its sampled token")
                continue
            if status is not None:
                finishing.append((seq, status))
        if finishing:
            self.finish_seqs(finishing)

    def finish_seq(self, seq: Sequence, status: SequenceStatus) -> None:
        self.finish_seqs([(seq, status)])

    def finish_seqs(self, finishing: list[tuple[Sequence, SequenceStatus]]) -> None:
        """End each sequence with its status: out of the scheduler's queues, its blocks and runner row freed."""
        self.scheduler.finish_all(finishing)
        for seq, _ in finishing:
            self._release(seq.seq_id)

    def fail_request(self, group: SequenceGroup, exc: BaseException, stage: str) -> None:
        """End every sequence of ``group`` with FINISHED_ERROR (freeing their blocks) and record why."""
        group.error = request_error(exc, stage, group.request_id)
        group.pending_samples = []
        group.pending_seeds = []
        for seq in group.seqs:
            seq.fork_count = 0
            if not seq.is_finished:
                self.finish_seq(seq, SequenceStatus.FINISHED_ERROR)

    def _fork(self, parent: Sequence, group: SequenceGroup, k: int) -> Sequence:
        """Sample k + 1 of a request: the parent's prompt and full prompt blocks, its own params and seed."""
        child = Sequence(parent.request_id, k + 1, parent.token_ids[:parent.num_prompt_tokens],
                         parent.num_prompt_tokens, group.pending_samples[k], parent.arrival_time,
                         seed=group.pending_seeds[k])
        child.prompt_tensor = parent.prompt_tensor  # read-only, shared
        # First, as it is the part that can fail: the child then holds no block yet.
        self.output_processor.start(child, group)
        self.block_manager.fork(parent, child)
        group.seqs.append(child)
        self.requests.add_seq(child, group)
        return child

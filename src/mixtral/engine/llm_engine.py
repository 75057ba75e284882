"""LLMEngine: requests in, tokens out, one ``step()`` (one forward pass) at a time.

The engine ties the pieces together: ``add_request`` tokenizes and admits a request (refusing one that can
never fit), ``step`` asks the scheduler for a batch, runs it through the model runner, and turns sampled
tokens into text and stop decisions (``engine/output_processor.py``). It is single-threaded; the asyncio
``AsyncEngine`` drives it from a background thread for the server.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import torch

from mixtral.engine.block_manager import BlockManager
from mixtral.engine.config import EngineConfig
from mixtral.engine.loading import load_for_engine
from mixtral.engine.memory import plan_num_blocks
from mixtral.engine.model_runner import LaunchedStep, ModelRunner, StepPlan
from mixtral.engine.output_processor import OutputProcessor
from mixtral.engine.outputs import RequestMetrics, RequestOutput
from mixtral.engine.sampler import Sampler, SamplerOutput, SampleRow
from mixtral.engine.scheduler import ScheduledSequence, Scheduler, SchedulerOutput
from mixtral.engine.sequence import Sequence, SequenceGroup, SequenceStatus
from mixtral.guide import bitmask_words
from mixtral.model.mixtral import Transformer
from mixtral.sampling import SamplingParams
from mixtral.tokenizer import Tokenizer


class RequestTooLongError(ValueError):
    """A request that can never be served: longer than max_model_len or than the whole KV cache."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load (what `/metrics` and benchmarks report)."""

    num_running: int  # sequences in the running batch
    num_waiting: int  # sequences waiting for admission (new or preempted)
    num_requests: int  # unfinished requests
    kv_cache_usage: float  # fraction of KV blocks referenced
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_hit_rate: float  # cached prompt tokens / prompt tokens looked up
    num_preemptions: int
    num_steps: int
    num_prompt_tokens: int  # tokens computed in prefill (chunks and recomputes included)
    num_generation_tokens: int  # tokens sampled
    num_finished_requests: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Inflight:
    """A launched step whose samples have not been applied yet."""

    plan: StepPlan
    targets: list[tuple[Sequence, int | None]]
    launched: LaunchedStep

    def is_stale(self) -> bool:
        """Every sequence it computes for has finished (or was aborted) since: its results are not wanted."""
        return all(s.seq.is_finished for s in self.plan.scheduled)


class LLMEngine:
    def __init__(self, model: Transformer, config: EngineConfig, tokenizer: Tokenizer | None = None,
                 model_name: str = "model") -> None:
        self.config = config.resolve(model.args.max_seq_len)
        self.model = model
        self.model_args = model.args
        self.model_name = model_name
        self.tokenizer = tokenizer
        eos = tokenizer.eos_id if tokenizer is not None else model.args.eos_id
        self.sampler = Sampler(model.args.vocab_size, eos)
        self.model_runner = ModelRunner(model, self.config, self.sampler)
        num_blocks = plan_num_blocks(self.config, model.args, model.dtype, model.device,
                                     self.model_runner.profile_activation_bytes)
        self.model_runner.allocate_kv_cache(num_blocks)
        self.block_manager = BlockManager(num_blocks, self.config.block_size, self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.config, self.block_manager)
        self.output_processor = OutputProcessor(tokenizer, eos, self.config.max_model_len or model.args.max_seq_len)
        self._groups: dict[str, SequenceGroup] = {}
        self._group_of: dict[int, SequenceGroup] = {}  # seq_id -> its request
        self._rng = random.Random(self.config.seed)
        self._guide_pool: ThreadPoolExecutor | None = None
        self._num_steps = 0
        self._num_prompt_tokens = 0
        self._num_generation_tokens = 0
        self._num_finished = 0
        # Async scheduling: the step launched ahead, before the previous one's tokens were known on the host.
        self._overlap = (self.config.async_scheduling if self.config.async_scheduling is not None
                         else model.device.type == "cuda")
        self._inflight: _Inflight | None = None

    @classmethod
    def from_config(cls, model: str | Transformer | None = None, *, device: torch.device | str | None = None,
                    dtype: torch.dtype | str | None = None, tokenizer: Tokenizer | None = None,
                    **engine_kwargs: Any) -> LLMEngine:
        """Load ``model`` (a folder, preset, "demo", Hub repo id, None = the default model, or a built
        ``Transformer``) and build an engine with ``EngineConfig(**engine_kwargs)``."""
        loaded, tok, name = load_for_engine(model, device, dtype, tokenizer, seed=engine_kwargs.get("seed", 0),
                                            max_model_len=engine_kwargs.get("max_model_len"))
        config = EngineConfig(device=loaded.device, dtype=loaded.dtype, **engine_kwargs)
        return cls(loaded, config, tok, name)

    # ----------------------------------------------------------------- requests
    def add_request(self, request_id: str, prompt: str | list[int], sampling_params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        """Admit a request (it waits for the scheduler). Raises ``RequestTooLongError`` if it can never fit,
        ``ValueError`` for a duplicate id, an empty prompt or token ids outside the vocabulary."""
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = sampling_params or SamplingParams()
        prompt_ids, prompt_text = self._encode_prompt(prompt)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine has none (use stop_token_ids)")
        # The sampler indexes the logits with these (min_tokens bans them): one outside the vocabulary would
        # crash the step for every request in the batch, so it is refused here.
        for name, ids in (("stop_token_ids", params.stop_token_ids or []), ("logit_bias", params.logit_bias or {})):
            bad_ids = [t for t in ids if t >= self.model_args.vocab_size]
            if bad_ids:
                raise ValueError(f"{name} {bad_ids[:5]} are outside the vocabulary (size {self.model_args.vocab_size})")
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n={params.n} exceeds max_num_seqs={self.config.max_num_seqs}")
        max_out = self._check_fits(len(prompt_ids), params)
        now = time.monotonic() if arrival_time is None else arrival_time
        samples = [params.clone() for _ in range(params.n)] if params.n > 1 else [params]
        seeds = [self._sample_seed(params.seed, i) for i in range(params.n)]
        first = Sequence(request_id, 0, list(prompt_ids), len(prompt_ids), samples[0], now, seed=seeds[0])
        first.fork_count = params.n - 1
        first.prompt_tensor = torch.tensor(first.token_ids, dtype=torch.int64)  # [P], sliced by each prefill chunk
        if params.prompt_logprobs is not None:
            first.prompt_logprobs = [None]
        group = SequenceGroup(request_id, prompt_text, prompt_ids, params, RequestMetrics(now), [first],
                              pending_samples=samples[1:], pending_seeds=seeds[1:], max_output_tokens=max_out)
        self.output_processor.start(first, group)
        self._groups[request_id] = group
        self._group_of[first.seq_id] = group
        self.scheduler.add(first)

    def abort_request(self, request_id: str | Iterable[str]) -> list[RequestOutput]:
        """Stop requests (unknown or finished ids are ignored) and free their blocks; returns their final
        outputs with finish_reason "abort"."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        outs = []
        for rid in ids:
            group = self._groups.pop(rid, None)
            if group is None:
                continue
            group.pending_samples = []
            for seq in group.seqs:
                if not seq.is_finished:
                    self._finish_seq(seq, SequenceStatus.FINISHED_ABORTED)
                self._group_of.pop(seq.seq_id, None)
            group.metrics.finished_time = time.monotonic()
            self._num_finished += 1
            outs.append(group.to_output())
        return outs

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups)

    def get_num_unfinished_requests(self) -> int:
        return len(self._groups)

    # ----------------------------------------------------------------- the step
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Run one forward pass; return the outputs of requests that got tokens or finished in it.

        ``finished_only``: build outputs only for requests that finished (offline callers that do not
        stream skip copying every running request's tokens each step).

        With async scheduling a decode step is launched before the previous step's samples are applied: the
        GPU computes step N + 1 (fed on step N's sampled ids, which never leave the device) while the host
        applies step N's tokens, checks stops and builds outputs. A sequence that finishes at step N has
        computed one token too many at N + 1: it is dropped. Any step that needs the host's view of the
        tokens (admissions, prefill chunks, guides, penalties, forks) waits for the previous step instead.
        """
        current = self._inflight
        self._inflight = None
        if current is not None and current.is_stale():
            current = None  # every sequence in it finished meanwhile: nothing to apply
        if current is None:
            current = self._launch_scheduled()
            if current is None:
                return []
        if self._overlap:
            self._inflight = self._launch_ahead(current)
        return self._apply_step(current, finished_only)

    def _launch_scheduled(self) -> _Inflight | None:
        """Schedule and launch a step (the scheduler's choice); None when there is nothing to run."""
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return None
        now = time.monotonic()
        self._num_steps += 1
        for seq_id, num_cached in sched.num_cached_tokens.items():
            group = self._group_of[seq_id]
            group.num_cached_tokens = num_cached
            if group.metrics.first_scheduled_time is None:
                group.metrics.first_scheduled_time = now
        plan, targets = self._plan(sched)
        bitmask_fn = self._submit_guides(plan.rows)
        self._num_prompt_tokens += sum(s.num_new_tokens for s in sched.scheduled if s.seq.is_prefill)
        launched = self.model_runner.launch(plan, bitmask_fn)
        self.scheduler.update_after_step(sched)
        return _Inflight(plan, targets, launched)

    def _launch_ahead(self, current: _Inflight) -> _Inflight | None:
        """Launch the decode step that follows ``current`` for its sequences, before ``current``'s samples are
        known on the host; None when that step would need them (or a new admission should come first).

        A waiting request that has a seat goes first (the scheduler admits it); behind a full batch it waits
        either way, so the overlap goes on. Each sequence's input is the token ``current`` samples for it, read
        from the device. Sequences
        certain to finish at ``current`` (length limits) are left out; ones that stop on a token are not
        known yet and compute one extra token that ``_apply_step`` drops.
        """
        if self.scheduler.can_admit() or current.launched.token_ids is None:
            return None
        plan = current.plan
        if len(plan.rows) != len(plan.scheduled) or any(k is not None for _, k in current.targets):
            return None  # a prefill chunk that samples nothing, or n > 1 forking: the scheduler decides
        max_len = self.config.max_model_len
        assert max_len is not None
        keep: list[int] = []
        for i, s in enumerate(plan.scheduled):
            seq = s.seq
            params = seq.params
            if params.guide is not None or params.has_penalties:
                return None  # both read the previous token on the host
            if seq.is_finished:
                continue
            # After ``current`` the sequence holds num_tokens + 1 tokens.
            if (seq.num_output_tokens + 1 >= self._group_of[seq.seq_id].max_output_tokens
                    or seq.num_tokens + 1 >= max_len):
                continue
            keep.append(i)
        if not keep:
            return None
        seqs = [plan.scheduled[i].seq for i in keep]
        bm = self.block_manager
        new_blocks = sum(bm.blocks_needed(seq.num_tokens + 1) - len(seq.block_table) for seq in seqs)
        if new_blocks > bm.num_free_blocks:
            return None  # memory is short: let the scheduler preempt
        for seq in seqs:
            bm.allocate_slots(seq, seq.num_tokens + 1)
        scheduled = [ScheduledSequence(seq, 1) for seq in seqs]
        rows = [SampleRow(seq.params, seq.seed, seq.num_output_tokens + 1) for seq in seqs]
        ahead = StepPlan(scheduled, rows, list(range(len(seqs))), [None] * len(seqs))
        prev_ids = current.launched.token_ids  # [R] on the device, row i = plan.scheduled[i]
        launched = self.model_runner.launch(ahead, None, input_ids=prev_ids,
                                            input_rows=keep if len(keep) != len(plan.rows) else None)
        self._num_steps += 1
        for seq in seqs:
            seq.num_computed_tokens += 1  # its K/V is being computed; the token itself arrives with ``current``
        return _Inflight(ahead, [(seq, None) for seq in seqs], launched)

    def _apply_step(self, step: _Inflight, finished_only: bool) -> list[RequestOutput]:
        """Wait for ``step``'s samples, apply them and build the outputs."""
        plan, targets = step.plan, step.targets
        result = step.launched.result()
        touched: dict[str, SequenceGroup] = {}
        for j, entries in result.prompt_logprobs.items():
            seq = plan.scheduled[j].seq
            for pos, entry in sorted(entries.items()):
                if seq.prompt_logprobs is not None and pos == len(seq.prompt_logprobs):
                    seq.prompt_logprobs.append(entry)
        if result.sampled is not None:
            self._apply_samples(plan, targets, result.sampled, touched)
        for s in plan.scheduled:
            if not s.seq.is_finished:
                # Publish blocks now full and computed; with a step launched ahead, their last token has just
                # arrived (the block manager hashes known tokens only).
                self.block_manager.cache_full_blocks(s.seq)

        outputs = []
        now = time.monotonic()
        for group in touched.values():
            if group.prompt_logprobs is None and group.seqs[0].prompt_logprobs is not None:
                group.prompt_logprobs = group.seqs[0].prompt_logprobs
            finished = group.is_finished
            if finished:
                group.metrics.finished_time = now
                self._groups.pop(group.request_id, None)
                for seq in group.seqs:
                    self._group_of.pop(seq.seq_id, None)
                self._num_finished += 1
            if finished or not finished_only:
                outputs.append(group.to_output())
        return outputs

    def _plan(self, sched: SchedulerOutput) -> tuple[StepPlan, list[tuple[Sequence, int | None]]]:
        """Sample rows for every sequence that reaches its last token; fork rows for n > 1 prompts.

        ``targets[i]`` is (sequence, None) for an ordinary row, (parent, k) for the first token of the
        request's k-th pending sample."""
        rows: list[SampleRow] = []
        owner: list[int] = []
        targets: list[tuple[Sequence, int | None]] = []
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
                group = self._group_of[seq.seq_id]
                for k, (p, seed) in enumerate(zip(group.pending_samples, group.pending_seeds, strict=True)):
                    prompt_ids = seq.token_ids[:seq.num_prompt_tokens] if p.has_penalties else []
                    rows.append(SampleRow(p, seed, 0, prompt_ids, []))
                    owner.append(j)
                    targets.append((seq, k))
        return StepPlan(sched.scheduled, rows, owner, prompt_lp), targets

    def _submit_guides(self, rows: list[SampleRow]) -> Callable[[], torch.Tensor | None] | None:
        """Start filling guided rows' bitmasks on worker threads (overlapping the forward pass)."""
        guided = [i for i, r in enumerate(rows) if r.params.guide is not None]
        if not guided:
            return None
        if self._guide_pool is None:
            self._guide_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="mixtral-guide")
        words = bitmask_words(self.model_args.vocab_size)
        # All allowed for unguided rows; pinned on CUDA so its copy to the device is asynchronous.
        bitmask = torch.full((len(rows), words), -1, dtype=torch.int32,
                             pin_memory=self.model_runner.device.type == "cuda")
        futures: list[Future[None]] = [
            self._guide_pool.submit(rows[i].params.guide.fill_bitmask, bitmask[i])  # type: ignore[union-attr]
            for i in guided
        ]

        def wait() -> torch.Tensor:
            for f in futures:
                f.result()
            return bitmask

        return wait

    def _apply_samples(self, plan: StepPlan, targets: list[tuple[Sequence, int | None]], sampled: SamplerOutput,
                       touched: dict[str, SequenceGroup]) -> None:
        now = time.monotonic()
        forked: dict[int, tuple[Sequence, list[Sequence]]] = {}  # parent seq_id -> (parent, new samples)
        seqs: list[tuple[int, Sequence]] = []
        for i, (seq, fork_k) in enumerate(targets):
            if seq.is_finished:
                continue  # finished (or aborted) after this step was launched: its token is not wanted
            group = self._group_of[seq.seq_id]
            if fork_k is not None:
                child = self._fork(seq, group, fork_k)
                forked.setdefault(seq.seq_id, (seq, []))[1].append(child)
                seq = child
            seq.append_token(sampled.token_ids[i], sampled.top_logprobs[i], sampled.logprobs[i])
            self._num_generation_tokens += 1
            seqs.append((i, seq))
            if seq.index == 0:
                if group.metrics.first_token_time is None:
                    group.metrics.first_token_time = now
                group.metrics.token_times.append(now)
                group.metrics.last_token_time = now
            touched[group.request_id] = group
        for parent, kids in forked.values():
            group = self._group_of[parent.seq_id]
            parent.fork_count = 0
            group.pending_samples = []
            group.pending_seeds = []
            self.scheduler.add_running_after(parent, kids)
        # Stop checks after forking, so a sample that finishes at once is freed like any other.
        for i, seq in seqs:
            status = self.output_processor.process_token(seq, self._group_of[seq.seq_id], sampled.token_ids[i])
            if status is not None:
                self._finish_seq(seq, status)

    def _finish_seq(self, seq: Sequence, status: SequenceStatus) -> None:
        self.scheduler.finish(seq, status)
        self.model_runner.release(seq.seq_id)

    def _fork(self, parent: Sequence, group: SequenceGroup, k: int) -> Sequence:
        """Sample k + 1 of a request: the parent's prompt and full prompt blocks, its own params and seed."""
        child = Sequence(parent.request_id, k + 1, parent.token_ids[:parent.num_prompt_tokens],
                         parent.num_prompt_tokens, group.pending_samples[k], parent.arrival_time,
                         seed=group.pending_seeds[k])
        child.prompt_tensor = parent.prompt_tensor  # read-only, shared
        self.block_manager.fork(parent, child)
        self.output_processor.start(child, group)
        group.seqs.append(child)
        self._group_of[child.seq_id] = group
        return child

    # ----------------------------------------------------------------- helpers
    def _encode_prompt(self, prompt: str | list[int]) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass the prompt as a list of token ids")
            ids, text = self.tokenizer.encode(prompt, bos=True), prompt
        else:
            ids, text = [int(t) for t in prompt], None
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.model_args.vocab_size
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
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        # max_tokens=None: up to the context length, or what the whole KV cache holds if that is less.
        max_out = params.max_tokens if params.max_tokens is not None else min(max_len, capacity) - prompt_len
        if prompt_len + max_out > max_len:
            raise RequestTooLongError(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_out}) = {prompt_len + max_out} tokens exceeds "
                f"max_model_len={max_len}; lower max_tokens to at most {max_len - prompt_len}"
            )
        need = self.block_manager.blocks_needed(prompt_len + max_out)
        if need > self.block_manager.num_blocks or max_out < 1:
            raise RequestTooLongError(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_out}) = {prompt_len + max_out} tokens exceeds the "
                f"whole KV cache ({capacity} tokens in {self.block_manager.num_blocks} blocks); lower max_tokens "
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

    # ----------------------------------------------------------------- introspection
    @property
    def runner(self) -> ModelRunner:
        """Short alias of ``model_runner``."""
        return self.model_runner

    def get_stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_requests=len(self._groups),
            kv_cache_usage=bm.usage,
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_blocks,
            prefix_cache_hit_rate=bm.prefix_cache_hit_rate,
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=self._num_steps,
            num_prompt_tokens=self._num_prompt_tokens,
            num_generation_tokens=self._num_generation_tokens,
            num_finished_requests=self._num_finished,
        )

    def expert_counts(self) -> torch.Tensor:
        """Tokens routed to each expert so far, [n_layers, num_experts] int64 on the CPU (syncs the device)."""
        return self.model_runner.expert_counts()

    def reset_prefix_cache(self) -> None:
        self.block_manager.reset_prefix_cache()

    def shutdown(self) -> None:
        if self._guide_pool is not None:
            self._guide_pool.shutdown(wait=False)
            self._guide_pool = None

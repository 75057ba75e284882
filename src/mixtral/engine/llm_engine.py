"""LLMEngine: requests in, tokens out, one ``step()`` (one forward pass) at a time.

The engine ties the pieces together and is the only one that drives the model runner:
- ``add_request``: ``admission.Admission`` validates and tokenizes the request (refusing one that can never
  fit) and the scheduler queues it;
- ``step``: the scheduler picks a batch, ``step_plan.StepPlanner`` plans what to sample (and the decode step
  launched ahead with async scheduling), the model runner computes it, and ``step_apply.StepApplier`` turns the
  sampled tokens into text, stop decisions and outputs; a failure that belongs to one request fails that request
  alone (``RequestOutput.error``), the rest of the batch goes on.
The model runner is used through ``launch``, ``release``, ``expert_counts`` and ``device`` only (plus its setup
in ``__init__``), so another executor can take its place. Single-threaded; the asyncio ``AsyncEngine`` drives
it from a background thread for the server.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from mixtral.distributed.engine import build_parallel_engine, pop_parallel_config
from mixtral.engine.admission import Admission, RequestTooLongError
from mixtral.engine.block_manager import BlockManager
from mixtral.engine.config import EngineConfig
from mixtral.engine.gc_freeze import HeapFreezer
from mixtral.engine.loading import load_for_engine
from mixtral.engine.model_runner import ModelRunner
from mixtral.engine.output_processor import OutputProcessor
from mixtral.engine.outputs import RequestOutput
from mixtral.engine.requests import RequestTable
from mixtral.engine.sampler import Sampler
from mixtral.engine.scheduler import Scheduler
from mixtral.engine.sequence import SequenceGroup, SequenceStatus
from mixtral.engine.step_apply import StepApplier
from mixtral.engine.step_plan import Inflight, StepPlanner
from mixtral.model.mixtral import Transformer
from mixtral.sampling import SamplingParams
from mixtral.tokenizer import Tokenizer

__all__ = ["EngineStats", "LLMEngine", "RequestTooLongError"]


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


def _checkpoint_kv_scales(model: str | Transformer | None, engine_kwargs: dict[str, Any]) -> None:
    """An FP8 KV cache without explicit ``kv_cache_scales`` takes the checkpoint's, where it carries them."""
    if (engine_kwargs.get("kv_cache_dtype") in ("fp8", "fp8_e4m3") and engine_kwargs.get("kv_cache_scales") is None
            and not isinstance(model, Transformer)):
        from mixtral.checkpoint.kv_scales import checkpoint_kv_scales

        engine_kwargs["kv_cache_scales"] = checkpoint_kv_scales(model)


class LLMEngine:
    def __init__(self, model: Transformer, config: EngineConfig, tokenizer: Tokenizer | None = None,
                 model_name: str = "model", runner_factory: Callable[..., ModelRunner] | None = None) -> None:
        """``runner_factory``: builds the model runner (default ``ModelRunner``); tensor / expert parallelism passes
        one whose runner drives the worker ranks too (distributed/engine.py)."""
        self.config = config.resolve(model.args.max_seq_len)
        self.model = model
        self.model_args = model.args
        self.model_name = model_name
        self.tokenizer = tokenizer
        eos = tokenizer.eos_id if tokenizer is not None else model.args.eos_id
        self.sampler = Sampler(model.args.vocab_size, eos)
        self.model_runner = (runner_factory or ModelRunner)(model, self.config, self.sampler)
        # The runner plans: under tensor / expert parallelism every rank measures its own free memory and the
        # smallest plan wins (ranks of one host can hold different amounts: another process, a display).
        num_blocks = self.model_runner.plan_num_blocks()
        self.model_runner.allocate_kv_cache(num_blocks)
        self.block_manager = BlockManager(num_blocks, self.config.block_size, self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.config, self.block_manager)
        self.output_processor = OutputProcessor(tokenizer, eos, self.config.max_model_len or model.args.max_seq_len)
        self.requests = RequestTable()
        self.admission = Admission(self.config, model.args.vocab_size, tokenizer, self.block_manager)
        self.planner = StepPlanner(self.config, self.scheduler, self.block_manager, self.requests,
                                   model.args.vocab_size, self.model_runner.device,
                                   mixed_ahead=getattr(self.model_runner, "mixed_ahead", False))
        # ``release`` goes through the engine's attribute, so a replaced (or wrapped) model runner is the one told.
        self.applier = StepApplier(self.scheduler, self.block_manager, self.output_processor, self.requests,
                                   lambda seq_id: self.model_runner.release(seq_id))
        # Async scheduling: the step launched ahead, before the previous one's tokens were known on the host.
        self._overlap = (self.config.async_scheduling if self.config.async_scheduling is not None
                         else model.device.type == "cuda")
        self._inflight: Inflight | None = None
        # The garbage collector skips the heap while requests run (gc_freeze.py): on by default where a device
        # waits for the host.
        self._heap = HeapFreezer(self.config.freeze_gc_heap if self.config.freeze_gc_heap is not None
                                 else model.device.type == "cuda")

    @classmethod
    def from_config(cls, model: str | Transformer | None = None, *, device: torch.device | str | None = None,
                    dtype: torch.dtype | str | None = None, tokenizer: Tokenizer | None = None,
                    **engine_kwargs: Any) -> LLMEngine:
        """Load ``model`` (a folder, GGUF file, preset, "demo", Hub repo id, None = the default model, or a built
        ``Transformer``) and build an engine with ``EngineConfig(**engine_kwargs)``. ``quantization=`` ("fp8",
        "int8", "int4"; None: as the checkpoint is) is taken out first and applied while loading. With
        ``kv_cache_dtype="fp8"`` and no ``kv_cache_scales``, a checkpoint's FP8 KV-cache scales are used."""
        parallel = pop_parallel_config(engine_kwargs)  # tensor_parallel_size=, enable_expert_parallel=, ...
        quantization = engine_kwargs.pop("quantization", None)  # applied while loading, not an engine setting
        if parallel.is_distributed:
            _checkpoint_kv_scales(model, engine_kwargs)
            return build_parallel_engine(cls, model, parallel, device=device, dtype=dtype, tokenizer=tokenizer,
                                         quantization=quantization, **engine_kwargs)
        loaded, tok, name = load_for_engine(model, device, dtype, tokenizer, seed=engine_kwargs.get("seed", 0),
                                            max_model_len=engine_kwargs.get("max_model_len"),
                                            quantization=quantization, kernels=engine_kwargs.get("kernels"))
        _checkpoint_kv_scales(model, engine_kwargs)  # after loading: a Hub repo's shards are local by now
        config = EngineConfig(device=loaded.device, dtype=loaded.dtype, **engine_kwargs)
        return cls(loaded, config, tok, name)

    # ----------------------------------------------------------------- requests
    def add_request(self, request_id: str, prompt: str | list[int], sampling_params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        """Admit a request (it waits for the scheduler). Raises ``RequestTooLongError`` if it can never fit,
        ``ValueError`` for a duplicate id, an empty prompt, token ids outside the vocabulary or sampling settings
        the engine cannot run."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        now = time.monotonic() if arrival_time is None else arrival_time
        group = self.admission.new_request(request_id, prompt, sampling_params or SamplingParams(), now)
        first = group.seqs[0]
        self.output_processor.start(first, group)
        self._heap.busy()
        self.requests.add(group)
        self.scheduler.add(first)

    def abort_request(self, request_id: str | Iterable[str]) -> list[RequestOutput]:
        """Stop requests (unknown or finished ids are ignored) and free their blocks; returns their final
        outputs with finish_reason "abort"."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        outs = []
        now = time.monotonic()
        for rid in ids:
            group = self.requests.groups.get(rid)
            if group is None:
                continue
            group.pending_samples = []
            for seq in group.seqs:
                if not seq.is_finished:
                    self.applier.finish_seq(seq, SequenceStatus.FINISHED_ABORTED)
            self.requests.remove(group, now)
            outs.append(group.to_output())
        if not self.requests:
            self._heap.idle()
        return outs

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ----------------------------------------------------------------- the step
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Run one forward pass; return the outputs of requests that got tokens or finished in it.

        ``finished_only``: build outputs only for requests that finished (offline callers that do not
        stream skip copying every running request's tokens each step).

        With async scheduling a decode step is launched before the previous step's samples are applied: the
        GPU computes step N + 1 (fed on step N's sampled ids, which never leave the device) while the host
        applies step N's tokens, checks stops and builds outputs. A sequence that finishes at step N has
        computed one token too many at N + 1: it is dropped. Admissions and prompt chunks go ahead too (their
        tokens are on the host) where the model runner takes such mixed steps; any step that needs the host's
        view of sampled tokens (guides, penalties, forks, prompt logprobs) waits for the previous step instead.
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
        outputs = self.applier.apply(current, finished_only)
        if not self.requests:
            self._heap.idle()
        return outputs

    def _launch_scheduled(self) -> Inflight | None:
        """Schedule and launch a step (the scheduler's choice); None when there is nothing to run."""
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return None
        counters = self.requests.counters
        counters.num_steps += 1
        self._note_admitted(sched.num_cached_tokens)
        plan, targets = self.planner.plan(sched)
        masks = self.planner.guide_masks(plan.rows)
        counters.num_prompt_tokens += sum(s.num_new_tokens for s in sched.scheduled if s.seq.is_prefill)
        launched = self.model_runner.launch(plan, masks.wait if masks is not None else None)
        self.scheduler.update_after_step(sched)
        return Inflight(plan, targets, launched, masks.errors if masks is not None else {})

    def _launch_ahead(self, current: Inflight) -> Inflight | None:
        """Launch the step that follows ``current`` before its samples are applied (see
        ``StepPlanner.plan_ahead``), or None."""
        ahead = self.planner.plan_ahead(current)
        if ahead is None:
            return None
        self._note_admitted(ahead.num_cached_tokens)
        self.requests.counters.num_prompt_tokens += ahead.num_prompt_tokens
        prev_ids = current.launched.token_ids  # [R] on the device: current's sampled rows
        launched = self.model_runner.launch(ahead.plan, None, input_ids=prev_ids, input_rows=ahead.input_rows)
        self.requests.counters.num_steps += 1
        return ahead.launched(launched)

    def _note_admitted(self, num_cached_tokens: dict[int, int]) -> None:
        """Requests a step admits: their prefix-cache hits and first scheduled time."""
        now = time.monotonic()
        for seq_id, num_cached in num_cached_tokens.items():
            group = self.requests.group_of[seq_id]
            group.num_cached_tokens = num_cached
            if group.metrics.first_scheduled_time is None:
                group.metrics.first_scheduled_time = now

    # ----------------------------------------------------------------- introspection
    @property
    def _groups(self) -> dict[str, SequenceGroup]:
        """Unfinished requests by id (kept for tests and tools that read it)."""
        return self.requests.groups

    @property
    def runner(self) -> ModelRunner:
        """Short alias of ``model_runner``."""
        return self.model_runner

    def get_stats(self) -> EngineStats:
        bm = self.block_manager
        counters = self.requests.counters
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_requests=len(self.requests),
            kv_cache_usage=bm.usage,
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_blocks,
            prefix_cache_hit_rate=bm.prefix_cache_hit_rate,
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=counters.num_steps,
            num_prompt_tokens=counters.num_prompt_tokens,
            num_generation_tokens=counters.num_generation_tokens,
            num_finished_requests=counters.num_finished,
        )

    def expert_counts(self) -> torch.Tensor:
        """Tokens routed to each expert so far, [n_layers, num_experts] int64 on the CPU (syncs the device)."""
        return self.model_runner.expert_counts()

    def reset_prefix_cache(self) -> None:
        self.block_manager.reset_prefix_cache()

    def shutdown(self) -> None:
        self._heap.idle()
        self.planner.shutdown()
        runner_shutdown = getattr(self.model_runner, "shutdown", None)  # a parallel runner stops its workers
        if runner_shutdown is not None:
            runner_shutdown()

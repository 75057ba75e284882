"""ModelRunner: turns a scheduled step into flat model inputs, runs the forward pass and samples.

Owns the KV cache tensors (per layer ``[num_blocks, block_size, KV, hd]``, in the model's dtype or, with
``kv_cache_dtype="fp8"``, float8_e4m3fn codes with a (k_scale, v_scale) pair per layer), the persistent device input
buffers and the cumulative expert-routing counts. Inputs are built on the host as plain lists and copied
into fixed device buffers, so a decode step launches no host syncs before sampling, and its inputs keep
stable addresses. The model gets ``config.kernels`` (which implementation runs each fused op) once, here. On
CUDA with the Triton kernels, pure decode steps replay CUDA graphs (engine/cuda_graphs.py) unless
``enforce_eager``, and except for steps that capture routing (engine/routing.py: ``StepPlan.routing``), which run
eagerly with the context's ``routing_capture`` set.

Flat layout of one step (block_size 4), sequence A decoding its 7th token, sequence B prefilling a
3-token chunk starting at position 4:
    input_ids   [a6, b4, b5, b6]          positions [6, 4, 5, 6]
    query_start_loc [0, 1, 4]             context_lens [7, 7]
    slot_mapping [tA[1]*4+2, tB[1]*4+0, tB[1]*4+1, tB[1]*4+2]   (tX = X's block table)
The logits of A's row 0 and B's row 3 are sampled only if B's chunk reaches its last token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mixtral.engine.attention import PagedAttentionContext
from mixtral.engine.block_tables import BlockTables
from mixtral.engine.config import KV_FP8_DTYPE, EngineConfig
from mixtral.engine.cuda_graphs import DecodeGraphs, PrefillGraph, batch_ladder
from mixtral.engine.host_tensors import host_tensor
from mixtral.engine.memory import plan_num_blocks
from mixtral.engine.routing import CapturedRouting, RoutingCapture, RoutingSpan
from mixtral.engine.sampler import SampledBatch, Sampler, SamplerOutput, SampleRow, SamplingTensors
from mixtral.engine.scheduler import ScheduledSequence
from mixtral.kernels.dispatch import GRAPH_DENSE_PREFILL_MIN_TOKENS
from mixtral.model.context import DenseContext
from mixtral.model.mixtral import Transformer

logger = logging.getLogger(__name__)

# A step with a sequence of at least this many new tokens builds its token, position and slot tensors with
# tensor ops per sequence; decode-sized steps keep the Python lists, cheaper for one token per sequence.
_VECTOR_MIN_TOKENS = 64


@dataclass
class StepPlan:
    """What to compute beyond the forward pass: sampled rows and prompt logprobs.

    ``rows[i]`` samples from the logits of ``scheduled[row_owner[i]]``'s last token (several rows may share
    one sequence: the first tokens of n > 1 samples). ``prompt_logprobs[j]`` is k (or None) for
    ``scheduled[j]``. ``routing[j]`` (engine/routing.py ``capture_start``) is the first position of ``scheduled[j]``'s
    chunk whose routing to keep, or None; ``routing`` itself is None when no sequence of the step asked, and then
    the step runs as it would without routing (CUDA graphs included). Not None: the step runs eagerly.
    """

    scheduled: list[ScheduledSequence]
    rows: list[SampleRow]
    row_owner: list[int]
    prompt_logprobs: list[int | None]
    routing: list[int | None] | None = None


@dataclass
class StepResult:
    sampled: SamplerOutput | None
    # Per scheduled sequence that asked: {index in prompt: {token_id: logprob}} for this chunk's positions.
    prompt_logprobs: dict[int, dict[int, dict[int, float]]]
    # Per scheduled sequence that asked: its captured routing rows (None: the step captured none).
    routing: dict[int, RoutingSpan] | None = None


@dataclass
class LaunchedStep:
    """A step whose forward pass and sampling are queued on the device; ``result`` waits for this step only."""

    sampled: SampledBatch | None
    prompt_logprobs: dict[int, dict[int, dict[int, float]]]
    routing: CapturedRouting | None = None

    @property
    def token_ids(self) -> torch.Tensor | None:
        """The sampled ids [R] still on the device (a following step can take its inputs from them)."""
        return self.sampled.token_ids if self.sampled is not None else None

    def result(self) -> StepResult:
        return StepResult(self.sampled.fetch() if self.sampled is not None else None, self.prompt_logprobs,
                          self.routing.fetch() if self.routing is not None else None)


class ModelRunner:
    # ``launch`` takes steps launched ahead that mix device-fed decoding sequences with host-fed prompt chunks.
    mixed_ahead = True

    def __init__(self, model: Transformer, config: EngineConfig, sampler: Sampler) -> None:
        assert config.max_model_len is not None, "resolve() the config first"
        model.set_kernel_config(config.kernels)
        self.model = model
        self.config = config
        self.sampler = sampler
        self.args = model.args
        self.device = model.device
        self.dtype = model.dtype
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cache_dtype = config.cache_dtype(self.dtype)
        self.kv_scales = self._kv_scales(config)  # per layer (k_scale, v_scale), or None (not an FP8 cache)
        self.num_blocks = 0
        self.expert_counts_buf = torch.zeros(self.args.n_layers, self.args.num_experts, dtype=torch.int64,
                                             device=self.device)  # [L, E]
        self.max_blocks_per_seq = -(-config.max_model_len // config.block_size)
        self._buffers: dict[str, torch.Tensor] = {}  # persistent device inputs
        self._staging: dict[str, torch.Tensor] = {}  # pinned host mirrors of _buffers
        self._inputs_copied: torch.cuda.Event | None = None
        self.block_tables = BlockTables(self.max_blocks_per_seq, self.device)
        self.graphs: DecodeGraphs | None = None
        self.prefill_graph: PrefillGraph | None = None
        self.fresh_prefill_graph: PrefillGraph | None = None  # a prompt's first chunk, dense attention

    # ----------------------------------------------------------------- setup
    def _kv_scales(self, config: EngineConfig) -> list[tuple[float, float]] | None:
        """The FP8 cache's per-layer scales: the config's (a checkpoint's), else 1.0 (kernels/kv_fp8.py says
        why); None for a cache in the model's dtype."""
        if self.cache_dtype != KV_FP8_DTYPE:
            return None
        n = self.args.n_layers
        if config.kv_cache_scales is None:
            logger.info("FP8 KV cache with scales 1.0 (the checkpoint carries none): values past 448 saturate")
            return [(1.0, 1.0)] * n
        if len(config.kv_cache_scales) != n:
            raise ValueError(f"kv_cache_scales has {len(config.kv_cache_scales)} (k_scale, v_scale) pairs for a "
                             f"model of {n} layers")
        return list(config.kv_cache_scales)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        shape = (num_blocks, self.config.block_size, self.args.n_kv_heads, self.args.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=self.cache_dtype, device=self.device),
             torch.zeros(shape, dtype=self.cache_dtype, device=self.device))
            for _ in range(self.args.n_layers)
        ]
        self.num_blocks = num_blocks
        if not self.config.enforce_eager and self._graph_safe():
            # The graphs bake the FP8 scales in as launch arguments: they are fixed from here on.
            self.graphs = DecodeGraphs(self.model, self.kv_caches, self.config.max_num_seqs, self.max_blocks_per_seq,
                                       self.config.max_model_len, self.expert_counts_buf, self.kv_scales)
            if self._wants_prefill_graph():
                self.prefill_graph = PrefillGraph(self.model, self.kv_caches, self.config.max_num_batched_tokens,
                                                  self.max_blocks_per_seq, self.config.max_model_len,
                                                  self.expert_counts_buf, kv_scales=self.kv_scales)
                self.prefill_graph.capture()
                if self._wants_fresh_prefill_graph():
                    self.fresh_prefill_graph = PrefillGraph(
                        self.model, self.kv_caches, self.config.max_num_batched_tokens, self.max_blocks_per_seq,
                        self.config.max_model_len, self.expert_counts_buf, fresh=True, kv_scales=self.kv_scales)
                    self.fresh_prefill_graph.capture(pool=self.prefill_graph.pool)
                self.graphs.pool = self.prefill_graph.pool  # never replayed together: one pool for all
            self.graphs.capture(batch_ladder(self.config.max_num_seqs))

    def _wants_prefill_graph(self) -> bool:
        """Whether ``allocate_kv_cache`` will capture the prefill graph (so the KV budget must leave room)."""
        c = self.config
        return (c.prefill_cuda_graph and not c.enforce_eager and c.max_model_len is not None
                and c.max_num_batched_tokens <= c.max_model_len and self._graph_safe())

    def _wants_fresh_prefill_graph(self) -> bool:
        """A second prefill graph for prompts' first chunks pays off where its attention takes the dense path."""
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        return (self.config.max_num_batched_tokens >= GRAPH_DENSE_PREFILL_MIN_TOKENS
                and self.model.kernels.dense_prefill_supported(probe, self.args.sliding_window))

    def _graph_safe(self) -> bool:
        """CUDA graphs need a CUDA device and kernels without host syncs: Triton attention and the fused MoE."""
        return self.model.kernels.graph_safe(self.device)

    def plan_num_blocks(self) -> int:
        """KV blocks this runner's device can hold (``engine/memory.py``: the config's budget, else free memory
        after loading minus the activation peak). A parallel runner plans on every rank and keeps the smallest."""
        return plan_num_blocks(self.config, self.args, self.dtype, self.device, self.profile_activation_bytes)

    @torch.inference_mode()
    def profile_activation_bytes(self) -> int:
        """Peak extra CUDA memory of one forward over ``max_num_batched_tokens`` tokens (before the KV cache)."""
        n = min(self.config.max_num_batched_tokens, self.config.max_model_len or self.config.max_num_batched_tokens)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        tokens = torch.zeros(n, dtype=torch.long, device=self.device)
        hidden = self.model.forward_tokens(tokens, DenseContext(1, n, self.device))  # [n, D]
        rows = min(n, self.config.max_num_seqs)
        self.model.compute_logits(hidden[:rows]).float().softmax(-1)  # the sampler's [R, V] work
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del hidden
        # The prefill graph keeps its own copy of this peak for good; eager steps still need theirs.
        return int(peak) * (2 if self._wants_prefill_graph() else 1)

    # ----------------------------------------------------------------- one step
    @torch.inference_mode()
    def launch(self, plan: StepPlan, bitmask_fn: Callable[[], torch.Tensor | None] | None = None,
               input_ids: torch.Tensor | None = None, input_rows: list[int] | None = None) -> LaunchedStep:
        """Queue the forward pass for ``plan.scheduled`` and the sampling of ``plan.rows``; no host sync (except
        for prompt logprobs, which are rare and wanted on the host).

        ``bitmask_fn`` returns the guided-decoding bitmask [R, W] (int32, CPU); it is called after the forward
        pass is launched, so masks computed on worker threads overlap the model. ``input_ids`` [N] (on the
        device) replaces the tokens read from the sequences: a step launched before the previous step's samples
        reached the host feeds on them directly; ``input_rows`` picks the rows of ``input_ids`` to use, one per
        scheduled sequence, or -1 for a sequence whose tokens are read from the host (a prompt's chunk in a step
        launched ahead: ``mixed_ahead``).
        """
        if self._inputs_copied is not None:
            # Last step's host-to-device copies must finish before their pinned staging is overwritten.
            self._inputs_copied.synchronize()
        ctx, ids, last_index, index, sampling, capture = self._prepare_launch(plan, input_ids, input_rows)
        eager = plan.routing is not None  # the graphs would not keep the router's outputs
        if (not eager and self.graphs is not None and ctx.max_query_len == 1
                and self.graphs.graph_size(len(plan.scheduled))):
            # Pure decode: replay the captured forward pass (one launch instead of hundreds).
            hidden = self.graphs.run(ids, ctx.positions, ctx.slot_mapping, ctx.block_tables,
                                     ctx.context_lens)  # [N, D]
        elif not eager and (prefill_graph := self._prefill_graph_for(plan, ids.shape[0], ctx)) is not None:
            # One sequence's full chunk: the captured forward instead of ~20 launches a layer from Python.
            hidden = prefill_graph.run(ids, ctx.positions, ctx.slot_mapping, ctx.block_tables,
                                       ctx.context_lens)  # [N, D]
        else:
            hidden = self.model.forward_tokens(ids, ctx)  # [N, D]
        bitmask = bitmask_fn() if bitmask_fn is not None else None

        sampled = None
        if index is not None:
            logits = self.model.compute_logits(hidden[index])  # [R, V]
            sampled = self.sampler.sample(logits, plan.rows, bitmask, sampling)
        routing = capture.gather() if capture is not None else None
        prompt_lp = self._prompt_logprobs(plan, hidden, last_index)
        return LaunchedStep(sampled, prompt_lp, routing)

    def _prepare_launch(self, plan: StepPlan, input_ids: torch.Tensor | None, input_rows: list[int] | None
                        ) -> tuple[PagedAttentionContext, torch.Tensor, list[int], torch.Tensor | None,
                                   SamplingTensors | None, RoutingCapture | None]:
        """The step's host work before the forward pass: its inputs, sampled-row index [R], sampling settings and
        routing capture, copied to the device (all before the event that guards the pinned staging). Returns
        (context, input ids [N], each sequence's last flat index, index, sampling, capture)."""
        if input_rows is not None and min(input_rows, default=0) < 0:
            input_ids = self._mixed_input_ids(plan.scheduled, input_ids, input_rows)
        elif input_ids is not None and input_rows is not None:
            # Through the pinned staging: a plain torch.tensor(..., device) would wait for the running step.
            input_ids = input_ids.index_select(0, self._put("input_rows", host_tensor(input_rows)))
        ctx, ids, last_index = self._prepare(plan.scheduled, input_ids)
        capture = None
        if plan.routing is not None:
            capture = RoutingCapture.for_step(plan.scheduled, plan.routing, last_index, self.args.n_layers,
                                              self._put)  # None on a TP worker, which keeps nothing
            ctx.routing_capture = capture  # type: ignore[attr-defined]  # read by each MoE layer
        index = sampling = None
        if plan.rows:
            index = self._put("sample_index", host_tensor([last_index[o] for o in plan.row_owner]))  # [R]
            sampling = self.sampler.prepare(plan.rows, self.device, self._put)
        if self.device.type == "cuda":
            self._inputs_copied = torch.cuda.Event()
            self._inputs_copied.record()
        return ctx, ids, last_index, index, sampling, capture

    def _mixed_input_ids(self, scheduled: list[ScheduledSequence], sampled: torch.Tensor | None,
                         input_rows: list[int]) -> torch.Tensor:
        """The input ids [N] (device) of a step whose sequences are fed partly by ``sampled`` (the previous step's
        sampled ids, still on the device: ``input_rows[j]`` >= 0 for a decoding sequence j) and partly by the
        host (-1: a prompt's chunk). The host's ids go in one copy, the sampled ones are scattered in on the
        device.

        Example: sequences [A decoding (row 3), B a 2-token chunk (host), C decoding (row 0)]: the host copy is
        [0, b0, b1, 0] and flat positions [0, 3] take sampled[3], sampled[0].
        """
        parts: list[torch.Tensor] = []
        pending: list[int] = []  # host ids of short sequences, packed together
        dst: list[int] = []  # flat positions fed from the device
        src: list[int] = []  # their rows of ``sampled``
        flat = 0
        for s, row in zip(scheduled, input_rows, strict=True):
            n = s.num_new_tokens
            if row >= 0:
                dst.append(flat)
                src.append(row)
                pending.append(0)  # replaced on the device
            elif n >= _VECTOR_MIN_TOKENS:
                if pending:
                    parts.append(host_tensor(pending))
                    pending = []
                parts.append(s.seq.new_token_ids(s.start, n))
            else:
                pending += s.seq.token_ids[s.start:s.start + n]
            flat += n
        if pending:
            parts.append(host_tensor(pending))
        # cat copies even a single part: on the CPU ``_put`` returns the host tensor, which is written below.
        ids = self._put("mixed_input_ids", torch.cat(parts))  # [N]
        if dst:
            assert sampled is not None, "a sequence fed by a previous step that sampled nothing"
            k = len(dst)
            index = self._put("mixed_input_feed", host_tensor(dst + src))  # [2K]
            ids.index_copy_(0, index[:k], sampled.index_select(0, index[k:]))
        return ids

    def _prefill_graph_for(self, plan: StepPlan, num_tokens: int, ctx: PagedAttentionContext
                           ) -> PrefillGraph | None:
        """The captured prefill graph this step can replay: the dense-attention one for a prompt's first
        chunk, the paged one for any full chunk, or None (run eagerly)."""
        fresh = ctx.fresh_prompt_lens is not None
        for graph in (self.fresh_prefill_graph, self.prefill_graph):
            if graph is not None and graph.fits(len(plan.scheduled), num_tokens, fresh):
                return graph
        return None

    def _prepare(self, scheduled: list[ScheduledSequence], input_ids: torch.Tensor | None = None
                 ) -> tuple[PagedAttentionContext, torch.Tensor, list[int]]:
        bs = self.config.block_size
        # One pass for the per-sequence lengths: this runs for every sequence of every step.
        qsl = [0]
        ctx_lens: list[int] = []
        total = max_new = 0
        fresh = True  # no sequence has K/V cached before this step's tokens
        for s in scheduled:
            n, start = s.num_new_tokens, s.start
            total += n
            qsl.append(total)
            ctx_lens.append(start + n)
            if n > max_new:
                max_new = n
            if start:
                fresh = False
        if max_new >= _VECTOR_MIN_TOKENS:
            ids_t, positions_t, slots_t = self._step_tokens_vectorized(scheduled, input_ids is None, bs)
        else:
            ids_t, positions_t, slots_t = self._step_tokens(scheduled, input_ids is None, bs)
        n = qsl[-1]
        if input_ids is not None and input_ids.shape[0] != n:
            raise ValueError(f"input_ids has {input_ids.shape[0]} tokens for a step of {n}")
        # Two host-to-device copies instead of five: each copy costs ~30 us of host time, which a lone
        # prefill's GPU waits for. tokens [3N or 2N] = (ids,) positions, slots; lens [S + S + 1] int32.
        tokens = self._put("step_tokens", torch.cat([positions_t, slots_t] if input_ids is not None
                                                    else [ids_t, positions_t, slots_t]))
        if input_ids is None:
            input_ids, tokens = tokens[:n], tokens[n:]
        lens = self._put("step_lens", host_tensor(ctx_lens + qsl, torch.int32))
        block_tables = self.block_tables.gather([s.seq for s in scheduled], self._put)  # [S, max_blocks_per_seq]
        ctx = PagedAttentionContext(
            positions=tokens[:n],
            slot_mapping=tokens[n:],
            block_tables=block_tables,
            context_lens=lens[:len(ctx_lens)],
            query_start_loc=lens[len(ctx_lens):],
            max_query_len=max_new,
            max_context_len=max(ctx_lens),
            kv_caches=self.kv_caches,
            kernels=self.model.kernels,
            sliding_window=self.args.sliding_window,
            expert_counts=self.expert_counts_buf,
            fresh_prompt_lens=[s.num_new_tokens for s in scheduled] if fresh else None,
            kv_scales=self.kv_scales,
        )
        return ctx, input_ids, [q - 1 for q in qsl[1:]]

    @staticmethod
    def _step_tokens(scheduled: list[ScheduledSequence], want_ids: bool, bs: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token ids, positions, KV slots) [N] int64 of the step's new tokens, built in Python lists: the
        cheapest way for decode-sized steps (one token per sequence)."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for s in scheduled:
            seq, start, n = s.seq, s.start, s.num_new_tokens
            table = seq.block_table
            if n == 1:  # a decode token: no slices, ranges or comprehensions
                if want_ids:
                    ids.append(seq.token_ids[start])
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
                continue
            if want_ids:
                ids += seq.token_ids[start:start + n]
            pos = range(start, start + n)
            positions += pos
            slots += [table[p // bs] * bs + p % bs for p in pos]
        return host_tensor(ids), host_tensor(positions), host_tensor(slots)

    @staticmethod
    def _step_tokens_vectorized(scheduled: list[ScheduledSequence], want_ids: bool, bs: int
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The same as ``_step_tokens``, with tensor ops for each sequence of at least ``_VECTOR_MIN_TOKENS``
        new tokens: a 2048-token prompt's per-token Python loop cost ~1-2 ms of host time while the GPU
        waited for the step's first kernels. Runs of shorter sequences (the decode tokens of a mixed step)
        keep the lists: tensor ops per one-token sequence cost more than the loop."""
        parts: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] = ([], [], [])
        short: list[ScheduledSequence] = []

        def flush() -> None:
            if short:
                for part, t in zip(parts, ModelRunner._step_tokens(short, want_ids, bs), strict=True):
                    part.append(t)
                short.clear()

        for s in scheduled:
            seq, start, n = s.seq, s.start, s.num_new_tokens
            if n < _VECTOR_MIN_TOKENS:
                short.append(s)
                continue
            flush()
            first = start // bs
            pos = torch.arange(start, start + n, dtype=torch.int64)  # [n]
            table = torch.tensor(seq.block_table[first:(start + n - 1) // bs + 1], dtype=torch.int64)  # blocks hit
            parts[0].append(seq.new_token_ids(start, n) if want_ids else torch.empty(0, dtype=torch.int64))
            parts[1].append(pos)
            parts[2].append(table[pos // bs - first] * bs + pos % bs)
        flush()
        ids_t, positions, slots = (torch.cat(p) for p in parts)
        return ids_t, positions, slots

    def _put(self, name: str, host: torch.Tensor) -> torch.Tensor:
        """Copy a host tensor into the persistent device buffer ``name`` (grown as needed); return the view.

        The copy goes through a pinned staging buffer so it is truly asynchronous (a copy from pageable
        memory would wait for the device); ``launch`` waits for the previous step's copies before writing
        staging again.
        """
        if self.device.type == "cpu":
            return host
        n = host.shape[0]
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < n:
            size = max(n, 2 * (buf.shape[0] if buf is not None else 0), 256)
            buf = self._buffers[name] = torch.zeros(size, dtype=host.dtype, device=self.device)
            self._staging[name] = torch.zeros(size, dtype=host.dtype, pin_memory=True)
        stage = self._staging[name][:n]
        stage.copy_(host)
        view = buf[:n]
        view.copy_(stage, non_blocking=True)
        return view

    def _prompt_logprobs(self, plan: StepPlan, hidden: torch.Tensor, last_index: list[int]
                         ) -> dict[int, dict[int, dict[int, float]]]:
        """Logprobs of prompt tokens start+1 .. whose predicting positions are in this chunk."""
        out: dict[int, dict[int, dict[int, float]]] = {}
        for j, k in enumerate(plan.prompt_logprobs):
            if k is None:
                continue
            s = plan.scheduled[j]
            seq = s.seq
            first = s.start  # position p predicts token p + 1
            stop = min(s.start + s.num_new_tokens, seq.num_prompt_tokens - 1)
            if stop <= first:
                continue
            flat0 = last_index[j] - (s.num_new_tokens - 1)  # flat index of position s.start
            h = hidden[flat0:flat0 + (stop - first)]  # [P, D]
            lp = torch.log_softmax(self.model.compute_logits(h).float(), dim=-1)  # [P, V]
            target_ids = seq.token_ids[first + 1:stop + 1]
            targets = torch.tensor(target_ids, device=lp.device)
            chosen = lp.gather(1, targets[:, None]).squeeze(1).tolist()
            top_v, top_i = (torch.topk(lp, k, dim=-1) if k else (lp[:, :0], lp[:, :0].long()))
            top_v_l, top_i_l = top_v.tolist(), top_i.tolist()
            entries: dict[int, dict[int, float]] = {}
            for r in range(stop - first):
                entry = dict(zip(top_i_l[r], top_v_l[r], strict=False))
                entry[target_ids[r]] = chosen[r]
                entries[first + 1 + r] = entry
            out[j] = entries
        return out

    def release(self, seq_id: int) -> None:
        """A sequence finished: drop its cached block-table row."""
        self.block_tables.release(seq_id)

    def expert_counts(self) -> torch.Tensor:
        """Cumulative routing counts [L, E] (copied to the host: a sync, on demand only)."""
        return self.expert_counts_buf.cpu()

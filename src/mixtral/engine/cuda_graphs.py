"""CUDA graphs for pure decode steps, and for one sequence's full prefill chunk: the whole forward pass
replayed as one launch.

At batch 1 a Mixtral decode step is a few hundred small kernels; launching them from Python costs more
than the GPU needs to run them. ``DecodeGraphs`` captures ``model.forward_tokens`` once for each batch size
of a ladder (1, 2, 4, 8, 16, 24, 32, then steps of 16 up to ``max_num_seqs``) over persistent input
buffers, and a decode step of n sequences copies its inputs into the first n rows of those buffers and
replays the smallest captured graph with at least n rows.

Padding rows (n < graph size) are made harmless: slot -1 (their K/V is not stored), context length 1 over
block 0 (a finite, ignored attention result), and a routing mask of 0 so they add nothing to the expert
utilization counts. Captured with ``max_context_len = max_model_len``: the attention kernels read the true
lengths on the device and only size their launch grid from this bound.

An FP8 cache's per-layer scales (``kv_scales``) are host floats, so each graph holds the values it was
captured with: they are fixed when the model runner allocates the cache, before any capture, and changing them
would mean capturing again.

Only graph-safe ops may run inside: the Triton kernels (no host syncs). ``Kernels.graph_safe`` says whether
they are in use; the model runner falls back to eager execution otherwise.
"""

from __future__ import annotations

import torch

from mixtral.engine.attention import PagedAttentionContext
from mixtral.kernels.dispatch import GRAPH_DENSE_PREFILL_MIN_TOKENS
from mixtral.model.mixtral import Transformer


def batch_ladder(max_batch: int) -> list[int]:
    """Batch sizes to capture: dense at the small end where steps are cheapest and padding costs most.

    Example: max_batch 40 -> [1, 2, 4, 8, 16, 24, 32, 40].
    """
    sizes = [b for b in (1, 2, 4, 8, 16, 24, 32) if b < max_batch]
    b = 48
    while b < max_batch:
        sizes.append(b)
        b += 16
    sizes.append(max_batch)
    return sorted(set(sizes))


class DecodeGraphs:
    def __init__(self, model: Transformer, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], max_batch: int,
                 max_blocks_per_seq: int, max_model_len: int, expert_counts: torch.Tensor | None,
                 kv_scales: list[tuple[float, float]] | None = None) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.kv_scales = kv_scales
        self.max_batch = max_batch
        self.max_model_len = max_model_len
        self.expert_counts = expert_counts
        dev = model.device
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=dev)  # [B]
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=dev)  # [B]
        self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.int64, device=dev)  # [B]
        self.block_tables = torch.zeros(max_batch, max_blocks_per_seq, dtype=torch.int32, device=dev)  # [B, W]
        self.context_lens = torch.ones(max_batch, dtype=torch.int32, device=dev)  # [B]
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=dev)  # [B + 1]
        self.routing_mask = torch.zeros(max_batch, dtype=torch.int64, device=dev)  # [B] 1 = real row
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # batch size -> hidden [b, D] written by its graph
        self.pool = None

    def _context(self, b: int) -> PagedAttentionContext:
        ctx = PagedAttentionContext(
            positions=self.positions[:b], slot_mapping=self.slot_mapping[:b], block_tables=self.block_tables[:b],
            context_lens=self.context_lens[:b], query_start_loc=self.query_start_loc[: b + 1], max_query_len=1,
            max_context_len=self.max_model_len, kv_caches=self.kv_caches, kernels=self.model.kernels,
            sliding_window=self.model.args.sliding_window, expert_counts=self.expert_counts,
            kv_scales=self.kv_scales,
        )
        ctx.routing_mask = self.routing_mask[:b]
        return ctx

    @torch.inference_mode()
    def capture(self, sizes: list[int]) -> None:
        """Capture one graph per size, largest first so the smaller ones reuse its memory pool."""
        self.slot_mapping.fill_(-1)
        self.routing_mask.zero_()
        stream = torch.cuda.Stream(self.model.device)
        stream.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(stream):
            for b in sorted(sizes, reverse=True):
                ctx = self._context(b)
                for _ in range(2):  # warm-up: Triton compiles and autotunes outside the capture
                    self.model.forward_tokens(self.input_ids[:b], ctx)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                    self.outputs[b] = self.model.forward_tokens(self.input_ids[:b], ctx)
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[b] = graph
        torch.cuda.current_stream(self.model.device).wait_stream(stream)
        torch.cuda.synchronize(self.model.device)

    def graph_size(self, n: int) -> int | None:
        """The smallest captured batch size >= n (None if n exceeds every graph)."""
        fits = [b for b in self.graphs if b >= n]
        return min(fits) if fits else None

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        """One decode step of n = len(input_ids) sequences -> hidden [n, D] (a view of the graph's output)."""
        n = input_ids.shape[0]
        b = self.graph_size(n)
        assert b is not None, f"no graph for batch {n}"
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(slot_mapping)
        self.block_tables[:n, : block_tables.shape[1]].copy_(block_tables)
        self.context_lens[:n].copy_(context_lens)
        self.routing_mask[:n].fill_(1)
        if b > n:  # padding rows: nothing stored, one harmless key, no routing counted
            self.slot_mapping[n:b].fill_(-1)
            self.context_lens[n:b].fill_(1)
            self.block_tables[n:b, 0].fill_(0)
            self.routing_mask[n:b].fill_(0)
        self.graphs[b].replay()
        return self.outputs[b][:n]


class PrefillGraph:
    """One sequence's chunk of exactly ``num_tokens`` new tokens (``max_num_batched_tokens``: the size of a
    lone long prompt's every full chunk) captured as one graph.

    An eager prefill step launches ~20 kernels a layer from Python; on an H100 with 8x7B layers the host
    took ~2 ms a layer against ~2.9 ms of GPU time, so the GPU sat idle for the first layer or two of every
    such step (docs/KERNELS.md). Replayed, the launches cost nothing. Steps of several
    sequences, or of another size, run eagerly. Attention goes through the paged kernel (the chunk may come
    after cached tokens); it reads the true context length on the device and sizes its grid from
    ``max_model_len``.

    ``fresh``: a second graph for a prompt's first chunk (nothing cached before it), whose attention takes the
    dense cuDNN path (``Kernels.dense_prefill_attention``) from ``GRAPH_DENSE_PREFILL_MIN_TOKENS``: about half
    the paged kernel's time at 2048 tokens on an H100, with its ~1 ms of host work paid once at capture.
    """

    def __init__(self, model: Transformer, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], num_tokens: int,
                 max_blocks_per_seq: int, max_model_len: int, expert_counts: torch.Tensor | None,
                 fresh: bool = False, kv_scales: list[tuple[float, float]] | None = None) -> None:
        self.model = model
        self.num_tokens = num_tokens
        dev = model.device
        self.input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=dev)  # [N]
        self.positions = torch.arange(num_tokens, dtype=torch.int64, device=dev)  # [N]
        self.slot_mapping = torch.full((num_tokens,), -1, dtype=torch.int64, device=dev)  # [N] -1: not stored
        self.block_tables = torch.zeros(1, max_blocks_per_seq, dtype=torch.int32, device=dev)  # [1, W]
        self.context_lens = torch.full((1,), num_tokens, dtype=torch.int32, device=dev)  # [1]
        self.ctx = PagedAttentionContext(
            positions=self.positions, slot_mapping=self.slot_mapping, block_tables=self.block_tables,
            context_lens=self.context_lens,
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=dev),
            max_query_len=num_tokens, max_context_len=max_model_len, kv_caches=kv_caches, kernels=model.kernels,
            sliding_window=model.args.sliding_window, expert_counts=expert_counts,
            fresh_prompt_lens=[num_tokens] if fresh else None,
            dense_min_tokens=GRAPH_DENSE_PREFILL_MIN_TOKENS if fresh else None, kv_scales=kv_scales,
        )
        self.fresh = fresh
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None  # hidden [N, D] written by the graph

    @torch.inference_mode()
    def capture(self, pool: object = None) -> None:
        """Warm up (Triton compiles outside the capture; nothing is stored: every slot is -1), then capture
        (into ``pool``, another graph's memory pool, when given: the two never replay at once)."""
        stream = torch.cuda.Stream(self.model.device)
        stream.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.model.forward_tokens(self.input_ids, self.ctx)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool, stream=stream):
                self.output = self.model.forward_tokens(self.input_ids, self.ctx)
        torch.cuda.current_stream(self.model.device).wait_stream(stream)
        torch.cuda.synchronize(self.model.device)

    @property
    def pool(self) -> object:
        """The graph's memory pool: the decode graphs are captured into it (never replayed at the same time)."""
        assert self.graph is not None, "capture() first"
        return self.graph.pool()

    def fits(self, num_seqs: int, num_tokens: int, fresh: bool = False) -> bool:
        """Whether a step of ``num_seqs`` sequences and ``num_tokens`` new tokens (``fresh``: none cached before
        them) can replay this graph."""
        return (self.graph is not None and num_seqs == 1 and num_tokens == self.num_tokens
                and (fresh or not self.fresh))

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        """The step's inputs (one sequence, ``num_tokens`` new tokens) -> hidden [N, D] (the graph's output)."""
        assert self.graph is not None and self.output is not None, "capture() first"
        self.input_ids.copy_(input_ids)
        self.positions.copy_(positions)
        self.slot_mapping.copy_(slot_mapping)
        self.block_tables[:, : block_tables.shape[1]].copy_(block_tables)
        self.context_lens.copy_(context_lens)
        self.graph.replay()
        return self.output

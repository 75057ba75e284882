"""Per-token expert routing for the requests that ask (``SamplingParams.return_routing`` / ``return_prompt_routing``).

The pieces, in the order a step meets them:

- ``capture_start`` (the step planner, per scheduled sequence that asked): the first position of the sequence's chunk
  whose routing the step keeps; the rows kept run from there to the chunk's end. ``StepPlan.routing`` holds these,
  and is None when no sequence of the step asked: then nothing below runs.
- ``RoutingCapture`` (the model runner): set on the step's attention context as ``routing_capture``; every MoE layer
  hands it the top-k ids [N, k] and fp32 weights [N, k] its router produced (model/moe.py), the very tensors its
  experts ran with. After the pass ``gather`` picks the kept rows, [M, L, k], and starts their copy to the host
  behind the step's other work (no sync).
- ``CapturedRouting.fetch`` (when the step is applied): per scheduled sequence a ``RoutingSpan``.
- ``RoutingRows``: a sequence's rows, append-only, handed to outputs as views without copying.

Which rows (the contract of serve/routing.py): generated row i is the routing of the pass whose logits sampled
token i, i.e. the last row of the chunk that sampled it (a request's generated row 0 is its last prompt position);
prompt row j is the routing at prompt position j. So each sampled token appends its chunk's last captured row, and
prompt positions are appended once, in order:
- async scheduling: a step launched ahead captures its one decode row like any step; a token it computed for a
  sequence that had already finished is dropped with its row (the applier skips finished sequences);
- n > 1: the k-th sample's first token comes from the prompt's last row, so every sample starts with that row;
- preemption (recompute): the tokens and their rows are kept; the recompute's chunks capture only the row that
  samples the next token, and prompt positions already recorded are not recorded again;
- chunked prefill: a chunk that samples nothing captures prompt rows only (and nothing for generated-only routing);
- prefix cache: a cached prompt block has no routing, so a request with ``return_prompt_routing`` computes its whole
  prompt (``SamplingParams.needs_full_prompt``; as with prompt logprobs). Generated routing needs no such rule: the
  last prompt token is never taken from the cache.

Cost: a step where no sequence asked runs exactly as before (CUDA graphs included; the MoE layer's one attribute
look-up per layer happens at graph capture or in eager Python only). A step where one did runs eagerly (its graphs
would not keep the router's outputs), plus one stack, one gather, one cast and one host copy of [M, L, 2k] floats.
Measured on a CPU (tiny model, decode of 16 sequences, CPU time per step, best of 4 rounds on a loaded 2-core box,
noise about 10%): 4.17 ms before capture existed, 3.92 ms with it and nobody asking, 3.99 ms with all 16 asking;
the checks that find nobody asked cost ~1 us per step of 64 sequences and ~0.8 us per eager 32-layer forward. A
GPU's eager step is slower than its graph replay: tests/gpu/test_gpu_routing.py prints the ratio.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from mixtral.engine.sampler import to_host_async

if TYPE_CHECKING:
    from mixtral.engine.scheduler import ScheduledSequence

# Expert ids go to the host inside a float32 tensor with the weights (one copy): exact below 2**24 experts.
_EXPERT_DTYPE = np.int16


class RoutingRows:
    """One sequence's per-token routing: expert ids int16 [T, L, k] (best first) and weights float32 [T, L, k].

    Append-only: ``arrays`` returns views of the first T rows, which later appends never write (a grown buffer is a
    new array), so outputs carry them without a copy and another thread may read them while the engine goes on.
    """

    def __init__(self) -> None:
        self._experts: np.ndarray | None = None
        self._weights: np.ndarray | None = None
        self.num_rows = 0

    def append(self, experts: np.ndarray, weights: np.ndarray) -> None:
        """Add rows: experts, weights [m, L, k]."""
        m = experts.shape[0]
        need = self.num_rows + m
        if self._experts is None or need > self._experts.shape[0]:
            capacity = max(need, 16, 2 * (self._experts.shape[0] if self._experts is not None else 0))
            grown_e = np.empty((capacity, *experts.shape[1:]), dtype=_EXPERT_DTYPE)
            grown_w = np.empty((capacity, *weights.shape[1:]), dtype=np.float32)
            if self._experts is not None and self._weights is not None:
                grown_e[:self.num_rows] = self._experts[:self.num_rows]
                grown_w[:self.num_rows] = self._weights[:self.num_rows]
            self._experts, self._weights = grown_e, grown_w
        assert self._weights is not None
        self._experts[self.num_rows:need] = experts
        self._weights[self.num_rows:need] = weights
        self.num_rows = need

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(experts, weights) [T, L, k] of the rows so far (read-only views; [0, 0, 0] before the first row)."""
        if self._experts is None or self._weights is None:
            empty = np.empty((0, 0, 0), dtype=_EXPERT_DTYPE)
            return empty, empty.astype(np.float32)
        experts, weights = self._experts[:self.num_rows], self._weights[:self.num_rows]
        experts.flags.writeable = False
        weights.flags.writeable = False
        return experts, weights


def capture_start(s: ScheduledSequence) -> int | None:
    """The first position of ``s``'s chunk whose routing this step keeps (rows from there to the chunk's end), or
    None when it needs none: its prompt positions not recorded yet (``return_prompt_routing``) and, when the chunk
    samples, the chunk's last position (``return_routing``)."""
    seq = s.seq
    start = s.start
    end = start + s.num_new_tokens
    first: int | None = None
    prompt = seq.prompt_routing
    if prompt is not None and prompt.num_rows < min(end, seq.num_prompt_tokens):
        first = max(start, prompt.num_rows)
    if seq.routing is not None and s.samples:
        first = end - 1 if first is None else first
    return first


@dataclass
class RoutingSpan:
    """The captured routing of one scheduled sequence: positions ``first`` .. ``first + len - 1`` of its chunk (the
    last one: the chunk's last position, whose logits a sampled token comes from)."""

    first: int
    experts: np.ndarray  # [m, L, k] int16
    weights: np.ndarray  # [m, L, k] float32

    @property
    def end(self) -> int:
        return self.first + self.experts.shape[0]


@dataclass
class CapturedRouting:
    """A step's kept routing rows on their way to the host."""

    spans: list[tuple[int, int, int]]  # (scheduled index, first position, rows), in row order
    host: tuple[torch.Tensor, torch.cuda.Event | None]  # [M, L, 2k] float32: expert ids, then weights
    top_k: int

    def fetch(self) -> dict[int, RoutingSpan]:
        """Wait for the copy (this step's work only) and split it per scheduled sequence."""
        packed, done = self.host
        if done is not None:
            done.synchronize()
        arr = packed.numpy()
        experts = arr[..., :self.top_k].astype(_EXPERT_DTYPE)  # [M, L, k]
        weights = np.ascontiguousarray(arr[..., self.top_k:])  # [M, L, k]
        out: dict[int, RoutingSpan] = {}
        at = 0
        for j, first, m in self.spans:
            out[j] = RoutingSpan(first, experts[at:at + m], weights[at:at + m])
            at += m
        return out


class RoutingCapture:
    """Records one forward pass's router outputs (each MoE layer calls ``record``) and gathers the kept rows."""

    def __init__(self, spans: list[tuple[int, int, int]], rows: torch.Tensor, num_layers: int) -> None:
        self.spans = spans
        self.rows = rows  # [M] flat rows of the step to keep, on the device
        self._ids: list[torch.Tensor | None] = [None] * num_layers
        self._weights: list[torch.Tensor | None] = [None] * num_layers

    @classmethod
    def for_step(cls, scheduled: Seq[ScheduledSequence], starts: Seq[int | None], last_index: Seq[int],
                 num_layers: int, put: Callable[[str, torch.Tensor], torch.Tensor]) -> RoutingCapture | None:
        """The capture of a step (``starts`` from ``capture_start`` per scheduled sequence; ``last_index[j]``: the
        flat row of sequence j's last new token); None when no sequence keeps a row. ``put`` copies the host row
        index to the device (the model runner's staging, so it never waits for a running step)."""
        rows: list[int] = []
        spans: list[tuple[int, int, int]] = []
        for j, first in enumerate(starts):
            if first is None:
                continue
            s = scheduled[j]
            m = s.start + s.num_new_tokens - first  # positions first .. the chunk's last
            stop = last_index[j] + 1
            rows.extend(range(stop - m, stop))
            spans.append((j, first, m))
        if not spans:
            return None
        return cls(spans, put("routing_rows", torch.tensor(rows, dtype=torch.int64)), num_layers)

    def record(self, layer_idx: int, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
        """One layer's routing of the step's N tokens: ids [N, k] (int), weights [N, k] fp32."""
        self._ids[layer_idx] = topk_ids
        self._weights[layer_idx] = topk_weights

    def gather(self) -> CapturedRouting:
        """The kept rows, [M, L, k] ids and weights packed into one float32 tensor, copying to the host."""
        missing = [i for i, t in enumerate(self._ids) if t is None]
        if missing:
            raise RuntimeError(f"routing capture: MoE layer(s) {missing} recorded nothing in this forward pass")
        ids = torch.stack(self._ids, dim=1).index_select(0, self.rows)  # type: ignore[arg-type]  # [M, L, k]
        weights = torch.stack(self._weights, dim=1).index_select(0, self.rows)  # type: ignore[arg-type]
        packed = torch.cat([ids.to(torch.float32), weights.to(torch.float32)], dim=-1)  # [M, L, 2k]
        return CapturedRouting(self.spans, to_host_async(packed), ids.shape[-1])

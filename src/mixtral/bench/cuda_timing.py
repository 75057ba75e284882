"""CUDA-graph capture and event timing for the GPU scripts: what kernels cost when they run the way the engine
runs a decode step (one graph, no host launches between them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def capture(fn: Callable[[], T]) -> tuple[torch.cuda.CUDAGraph, T]:
    """Run ``fn`` once on a side stream (Triton compiles there, outside the capture), then capture it as one
    graph: (graph, the outputs its replays overwrite)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def events_ms(run: Callable[[], object], reps: int = 20, per_rep: int = 1) -> float:
    """Median milliseconds of one ``run()``, over ``reps`` samples of ``per_rep`` back-to-back calls between
    two CUDA events (several calls per sample hide the host's submission latency, as inside a model's graph)."""
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(per_rep):
            run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / per_rep)
    return sorted(times)[reps // 2]


def graph_ms(fn: Callable[[], object], reps: int = 20, per_rep: int = 1) -> float:
    """``events_ms`` of the replay of ``fn`` captured as one graph (after one warm replay)."""
    graph, _ = capture(fn)
    graph.replay()
    return events_ms(graph.replay, reps, per_rep)


def alternated_replays(graphs: dict[str, torch.cuda.CUDAGraph], rounds: int) -> dict[str, list[float]]:
    """Milliseconds of each graph's replay over ``rounds`` rounds, the order reversed every other round, so
    clock and power drift hit every graph alike (one untimed replay each first)."""
    for g in graphs.values():
        g.replay()
    times: dict[str, list[float]] = {label: [] for label in graphs}
    order = list(graphs)
    for r in range(rounds):
        for label in order if r % 2 == 0 else order[::-1]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graphs[label].replay()
            end.record()
            end.synchronize()
            times[label].append(start.elapsed_time(end))
    return times

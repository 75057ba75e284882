"""The timed loops of ``mixtral bench gpu``, one engine at a time: decode at a batch size, a long prefill, an
offline run (with the share of each step the device waited for the host).

Each function takes a built ``LLMEngine`` and returns plain numbers; it leaves the engine with no request
(aborted or finished). Not here: building engines, rooflines, the scheme loop (bench/gpu_runner.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from mixtral.model.args import ModelArgs


def sync(engine: Any) -> None:
    """Wait for the engine's device (nothing to wait for on a CPU)."""
    device = engine.model_runner.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompts(vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    # Avoid ids 0-999: control tokens of the v3 vocabulary live at the bottom.
    return torch.randint(1000, vocab, (n, length), generator=gen).tolist()


def _run_until_prefilled(engine: Any, ids: list[str]) -> None:
    """Step until every request in ``ids`` has produced its first token."""
    pending = set(ids)
    while pending:
        for out in engine.step():
            if out.outputs and out.outputs[0].token_ids:
                pending.discard(out.request_id)


def bench_decode(engine: Any, margs: ModelArgs, batch: int, context: int, steps: int) -> float:
    """Decode tok/s of ``batch`` sequences with ``context``-token prompts, timed over ``steps`` steps."""
    from mixtral.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
    ids = [f"d{batch}-{i}" for i in range(batch)]
    for rid, prompt in zip(ids, prompts(margs.vocab_size, batch, context, seed=batch), strict=True):
        engine.add_request(rid, prompt, params)
    _run_until_prefilled(engine, ids)
    for _ in range(3):  # warm-up decode steps (graph replay paths, allocator)
        engine.step()
    sync(engine)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(engine)
    elapsed = time.perf_counter() - t0
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    return batch * steps / elapsed


def bench_prefill(engine: Any, margs: ModelArgs, length: int, repeats: int = 3, rest_s: float = 0.0) -> float:
    """Seconds to prefill one ``length``-token prompt (best of ``repeats``; prefix caching defeated).

    With ``rest_s`` 0 the runs follow each other (and the warm-up run) back to back. With ``rest_s`` > 0 the
    GPU idles that long before each timed run, as before a lone prompt on a quiet server: on an H200 such a
    prefill ran ~7% faster than the next one (docs/KERNELS.md), which finds the board's power
    budget already spent by the run before it."""
    from mixtral.sampling import SamplingParams

    best = float("inf")
    for r in range(repeats + 1):
        prompt = prompts(margs.vocab_size, 1, length, seed=10_000 + r)[0]
        engine.add_request(f"p{r}", prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
        sync(engine)
        if r and rest_s > 0:
            time.sleep(rest_s)
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        sync(engine)
        if r:  # the first run warms up the prefill shapes
            best = min(best, time.perf_counter() - t0)
    return best


class LaunchClock:
    """The device time of every step the engine launches, to set against the wall time of a run.

    Wraps this engine's ``model_runner.launch`` (the one call through which a step's work reaches the device;
    nothing global changes). On CUDA it records an event before and after each launch on the current stream: the
    first is reached when the device finishes what was queued before (or at once if it was idle), the second when
    this step's work is done, so their distance is this step's device time, and the run's wall time minus their
    sum is the time the device sat idle waiting for the host. On a CPU a launch computes synchronously, so its
    wall time is its device time. ``close()`` restores the runner.
    """

    def __init__(self, engine: Any) -> None:
        self.runner = engine.model_runner
        self.cuda = self.runner.device.type == "cuda"
        self.launches = 0
        self._events: list[tuple[Any, Any]] = []
        self._cpu_seconds = 0.0
        launch = self.runner.launch

        def timed(*args: Any, **kwargs: Any) -> Any:
            self.launches += 1
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = launch(*args, **kwargs)
                end.record()
                self._events.append((start, end))
                return out
            t0 = time.perf_counter()
            out = launch(*args, **kwargs)
            self._cpu_seconds += time.perf_counter() - t0
            return out

        self.runner.launch = timed

    def close(self) -> None:
        del self.runner.launch  # the instance attribute: the class's method shows through again

    def device_seconds(self) -> float:
        """Summed device time of the launches so far (synchronizes on CUDA)."""
        if not self.cuda:
            return self._cpu_seconds
        torch.cuda.synchronize(self.runner.device)
        return sum(start.elapsed_time(end) for start, end in self._events) / 1e3


def host_share(wall_s: float, device_s: float, steps: int) -> dict[str, float]:
    """Per step: wall and device milliseconds, and the share of the wall time the device waited for the host."""
    steps = max(steps, 1)
    idle = max(wall_s - device_s, 0.0)
    return {"steps": steps, "wall_ms_per_step": 1e3 * wall_s / steps, "device_ms_per_step": 1e3 * device_s / steps,
            "host_ms_per_step": 1e3 * idle / steps, "host_share": idle / wall_s if wall_s > 0 else 0.0}


def bench_offline(engine: Any, margs: ModelArgs, n: int, in_len: int, out_len: int, warmup: bool = True,
                  progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Output and total tok/s of ``n`` requests of ``in_len`` prompt and ``out_len`` generated tokens, all
    submitted at once, with the host's share of the run (``LaunchClock``) and how many sequences ran per step.
    ``warmup`` first runs as many requests as run at once (other prompts) for two tokens each: their prefill
    steps pack several prompts into one batch, whose kernels compile on first use, which took seconds of a
    4-second 128/128 run on a fresh machine. ``progress`` gets the count of each step's finished requests."""
    from mixtral.sampling import SamplingParams

    if warmup:
        short = SamplingParams(temperature=0.0, max_tokens=min(out_len, 2), ignore_eos=True)
        count = min(n, engine.config.max_num_seqs)
        for i, prompt in enumerate(prompts(margs.vocab_size, count, in_len, seed=in_len * 7 + out_len + 1)):
            engine.add_request(f"w{in_len}-{out_len}-{i}", prompt, short)
        while engine.has_unfinished_requests():
            engine.step()
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    for i, prompt in enumerate(prompts(margs.vocab_size, n, in_len, seed=in_len * 7 + out_len)):
        engine.add_request(f"o{in_len}-{out_len}-{i}", prompt, params)
    preempted = engine.get_stats().num_preemptions
    running: list[int] = []
    sync(engine)
    clock = LaunchClock(engine)
    t0 = time.perf_counter()
    generated = 0
    try:
        while engine.has_unfinished_requests():
            finished = 0
            for out in engine.step(finished_only=True):
                if out.finished:
                    generated += len(out.outputs[0].token_ids)
                    finished += 1
            running.append(len(engine.scheduler.running))
            if progress is not None:
                progress(finished)
        sync(engine)
        elapsed = time.perf_counter() - t0
        device_s = clock.device_seconds()
    finally:
        clock.close()
    return {"requests": n, "input_len": in_len, "output_len": out_len, "seconds": elapsed,
            "output_tok_s": generated / elapsed, "total_tok_s": (generated + n * in_len) / elapsed,
            "max_num_seqs": engine.config.max_num_seqs, "max_running": max(running, default=0),
            "mean_running": sum(running) / max(len(running), 1),
            "preemptions": engine.get_stats().num_preemptions - preempted,
            "host": host_share(elapsed, device_s, clock.launches)}

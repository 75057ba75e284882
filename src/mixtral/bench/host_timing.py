"""Per-step host time of an ``LLMEngine``, split by phase: what ``bench host_overhead`` and ``bench throughput
--report-host-time`` report.

``StepTimer.attach(engine)`` wraps the engine's step and the methods each phase runs (on that engine instance
only; nothing global changes) and records, per ``engine.step()`` call, the wall time and the exclusive time of
each phase (a phase's time excludes the phases nested in it):

- ``schedule``: ``Scheduler.schedule`` (admission, block allocation, preemption);
- ``plan``: ``StepPlanner.plan`` / ``plan_ahead`` / ``guide_masks`` (rows to sample, the step launched ahead);
- ``prepare``: ``ModelRunner._prepare_launch`` (token / position / slot tensors, block tables, sampling
  settings, their copies to the device);
- ``launch``: the rest of ``launch`` (on a GPU: launching the forward pass or replaying its graph, and the
  sampler's kernels);
- ``wait``: the host blocked on the device (the previous step's input copies, the sampled ids' copy back); 0 on
  CPU, where nothing runs asynchronously;
- ``fetch``: unpacking the sampled ids and logprobs into Python lists;
- ``apply``: appending the tokens to their sequences (and forking n > 1 samples);
- ``stops``: detokenizing each new token, the stop checks, and freeing the sequences that finished;
- ``publish``: offering newly full KV blocks to the prefix cache;
- ``outputs``: building the step's ``RequestOutput``s and retiring finished requests;
- ``other``: the rest of ``step`` (the engine's own bookkeeping).

Host time is the step's wall time minus ``wait``. ``gc`` (not a phase: it lands inside whichever phase allocated)
is the time the step spent in Python's garbage collector, whose full collections of a large heap are the longest
host pauses. The wrappers cost about a microsecond per wrapped call, a
dozen calls a step. Not a profiler: cProfile (``bench host_overhead --profile``) says which lines inside a
phase cost.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PHASES = ("schedule", "plan", "prepare", "launch", "wait", "fetch", "apply", "stops", "publish", "outputs",
          "other")


@dataclass
class StepRecord:
    """One ``engine.step()``: its wall time and each phase's exclusive time, in seconds."""

    wall: float
    phases: dict[str, float]
    num_running: int  # sequences running after the step
    num_scheduled: int  # sequences in the steps launched during this call (the larger, with a step ahead)
    num_prefill_tokens: int  # prompt tokens in the steps launched during this call
    gc: float = 0.0  # seconds spent in garbage collections during the step (inside the phases' times)
    # Whether the step launched its successor ahead (async scheduling) or only the scheduler's step: a step that
    # launches nothing ahead leaves the device idle while the host applies it and schedules the next.
    launched_ahead: bool = False

    @property
    def host(self) -> float:
        return self.wall - self.phases.get("wait", 0.0)


@dataclass
class StepTimer:
    """Phase timings of every ``step()`` of the engine it is attached to."""

    # What a phase's time is measured with: wall time by default; ``time.thread_time`` (CPU time of the engine's
    # thread) on a shared host, where other processes' load would otherwise land in whichever phase it hit.
    # Waits on the device take no CPU time: measure them on the wall clock.
    clock: Callable[[], float] = time.perf_counter
    records: list[StepRecord] = field(default_factory=list)
    # A stack of "time spent in nested phases" accumulators, one per wrapped call in progress.
    _stack: list[float] = field(default_factory=list)
    _current: dict[str, float] = field(default_factory=dict)
    _scheduled: int = 0
    _prefill_tokens: int = 0
    _gc_start: float = 0.0
    _gc_total: float = 0.0
    _ahead: bool = False

    @classmethod
    def attach(cls, engine: Any, clock: Callable[[], float] = time.perf_counter) -> StepTimer:
        """Wrap ``engine``'s step and phase methods; returns the timer collecting their times."""
        timer = cls(clock=clock)
        runner = engine.model_runner
        local = getattr(runner, "local", runner)  # a parallel runner's rank-0 ModelRunner prepares the inputs
        timer._wrap(engine.scheduler, "schedule", "schedule")
        for name in ("plan", "plan_ahead", "guide_masks"):
            timer._wrap(engine.planner, name, "plan")
        timer._note_ahead(engine.planner)
        timer._wrap(local, "_prepare_launch", "prepare")
        timer._wrap_launch(runner, local)
        timer._wrap(engine.applier, "_apply_samples", "apply")
        timer._wrap(engine.applier, "_check_stops", "stops")
        timer._wrap(engine.applier, "_publish_blocks", "publish")
        timer._wrap(engine.applier, "_build_outputs", "outputs")
        timer._wrap_step(engine)
        gc.callbacks.append(timer._on_gc)
        return timer

    def close(self) -> None:
        """Stop counting garbage collections (the engine's wrappers stay: they live as long as it)."""
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_start = self.clock()
        else:
            self._gc_total += self.clock() - self._gc_start

    # ----------------------------------------------------------------- wrappers
    def _timed(self, phase: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self._stack.append(0.0)
        t0 = self.clock()
        try:
            return fn(*args, **kwargs)
        finally:
            elapsed = self.clock() - t0
            nested = self._stack.pop()
            self._current[phase] = self._current.get(phase, 0.0) + elapsed - nested
            if self._stack:
                self._stack[-1] += elapsed

    def _wrap(self, obj: Any, name: str, phase: str) -> None:
        original = getattr(obj, name)  # an AttributeError here means the engine changed: update the phase map

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            return self._timed(phase, original, *args, **kwargs)

        setattr(obj, name, wrapped)

    def _note_ahead(self, planner: Any) -> None:
        original = planner.plan_ahead

        def plan_ahead(*args: Any, **kwargs: Any) -> Any:
            ahead = original(*args, **kwargs)
            self._ahead = self._ahead or ahead is not None
            return ahead

        planner.plan_ahead = plan_ahead

    def _wait(self, event: Any) -> None:
        """Time the host blocked on a CUDA event (the wrapped call's own wait then returns at once)."""
        if event is not None:
            self._timed("wait", event.synchronize)

    def _wrap_launch(self, runner: Any, local: Any) -> None:
        original = runner.launch

        def launch(plan: Any, *args: Any, **kwargs: Any) -> Any:
            self._scheduled = max(self._scheduled, len(plan.scheduled))
            self._prefill_tokens += sum(s.num_new_tokens for s in plan.scheduled if s.num_new_tokens > 1)
            self._wait(getattr(local, "_inputs_copied", None))
            launched = self._timed("launch", original, plan, *args, **kwargs)
            result = launched.result

            def timed_result() -> Any:
                if launched.sampled is not None:
                    self._wait(launched.sampled.host[1])
                return self._timed("fetch", result)

            launched.result = timed_result
            return launched

        runner.launch = launch

    def _wrap_step(self, engine: Any) -> None:
        original = engine.step

        def step(*args: Any, **kwargs: Any) -> Any:
            self._current = {}
            self._scheduled = self._prefill_tokens = 0
            self._ahead = False
            gc_before = self._gc_total
            t0 = self.clock()
            self._stack.append(0.0)
            try:
                return original(*args, **kwargs)
            finally:
                wall = self.clock() - t0
                self._current["other"] = wall - self._stack.pop()
                self.records.append(StepRecord(wall, self._current, len(engine.scheduler.running),
                                               self._scheduled, self._prefill_tokens, self._gc_total - gc_before,
                                               self._ahead))

        engine.step = step

    # ----------------------------------------------------------------- summaries
    def summary(self, records: list[StepRecord] | None = None) -> dict[str, float]:
        """Mean milliseconds per step of each phase, plus ``wall``, ``host``, ``gc``, ``steps`` and
        ``ahead`` (the share of steps that launched their successor ahead)."""
        recs = self.records if records is None else records
        n = max(len(recs), 1)
        out = {phase: 1000 * sum(r.phases.get(phase, 0.0) for r in recs) / n for phase in PHASES}
        out["wall"] = 1000 * sum(r.wall for r in recs) / n
        out["host"] = 1000 * sum(r.host for r in recs) / n
        out["gc"] = 1000 * sum(r.gc for r in recs) / n
        out["ahead"] = sum(r.launched_ahead for r in recs) / n  # share of steps that launched one ahead
        out["steps"] = float(len(recs))
        return out

    def decode_steps(self, min_running: int) -> list[StepRecord]:
        """Steps that launched only decode tokens with at least ``min_running`` sequences scheduled."""
        return [r for r in self.records if r.num_prefill_tokens == 0 and r.num_scheduled >= min_running]

    def prefill_steps(self) -> list[StepRecord]:
        """Steps that launched prompt tokens (admissions, prefill chunks)."""
        return [r for r in self.records if r.num_prefill_tokens > 0]

"""``python -m mixtral.bench.host_overhead``: the engine's host work per step at large batches, without a model.

Runs the real ``LLMEngine`` (scheduler, block manager, planner, input preparation, sampling settings, token
application, detokenization, stop checks, outputs) over an offline workload, with a model runner whose forward
pass and sampling are replaced by random token ids (``HostOnlyRunner``): everything the host does per step is
there, the GPU's part costs nothing. It reports the mean host milliseconds per step split by phase
(``host_timing.PHASES``; the engine thread's CPU time by default, steady on a shared machine) for the decode steps
at a full batch and for the steps that carry prompt tokens, at each ``--max-num-seqs``, and optionally a cProfile
of the run (``--profile``).

What it answers: whether the host keeps up with a GPU whose decode step takes T ms at that batch (with async
scheduling the host's work hides behind the running step only while it is shorter). What it does not see: the
GPU-only host costs (pinned copies, graph replay, kernel launches, event syncs): ``mixtral bench throughput
--report-host-time`` measures those on the GPU.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mixtral.bench.args import non_negative_float, positive_int
from mixtral.bench.host_timing import PHASES, StepTimer
from mixtral.bench.report import print_table
from mixtral.bench.throughput import synthetic_requests
from mixtral.engine.config import EngineConfig
from mixtral.engine.model_runner import LaunchedStep, ModelRunner, StepPlan
from mixtral.engine.sampler import SampledBatch
from mixtral.sampling import DEFAULT_TEMPERATURE, SamplingParams


class HostOnlyRunner(ModelRunner):
    """A ModelRunner that prepares every step's inputs like the real one and returns random token ids in place
    of the forward pass and the sampler (ids >= 1000: past the control tokens, never EOS). No KV cache is allocated."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gen = torch.Generator().manual_seed(0)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks

    def launch(self, plan: StepPlan, bitmask_fn: Any = None, input_ids: torch.Tensor | None = None,
               input_rows: list[int] | None = None) -> LaunchedStep:
        self._prepare_launch(plan, input_ids, input_rows)
        if bitmask_fn is not None:
            bitmask_fn()
        if not plan.rows:
            return LaunchedStep(None, {})
        r = len(plan.rows)
        token_ids = torch.randint(1000, self.args.vocab_size, (r,), generator=self._gen)  # [R]
        packed = torch.stack([token_ids.double(), torch.full((r,), -1.0, dtype=torch.float64)])  # [2, R]
        return LaunchedStep(SampledBatch(token_ids, (packed, None), [None] * r, 0), {})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-prompts", type=positive_int, default=2048, help="number of requests (default: 2048)")
    p.add_argument("--input-len", type=positive_int, default=128, help="prompt length in tokens (default: 128)")
    p.add_argument("--output-len", type=positive_int, default=128,
                   help="tokens generated per request, EOS ignored (default: 128)")
    p.add_argument("--max-num-seqs", type=positive_int, nargs="+", default=[256, 512, 1024],
                   help="running-batch sizes to measure, one run each (default: 256 512 1024)")
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=2048,
                   help="tokens per step, the chunked-prefill budget (default: 2048)")
    p.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV block (default: 16)")
    p.add_argument("--temperature", type=non_negative_float, default=DEFAULT_TEMPERATURE,
                   help=f"sampling temperature of the requests; 0 is greedy (default: {DEFAULT_TEMPERATURE})")
    p.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    p.add_argument("--no-async-scheduling", action="store_true",
                   help="apply each step before launching the next (default: launched ahead, as on a GPU)")
    p.add_argument("--no-freeze-gc-heap", action="store_true",
                   help="leave the startup heap to the garbage collector (default: frozen, as on a GPU; see "
                        "EngineConfig.freeze_gc_heap)")
    p.add_argument("--tokenizer", choices=("v1", "v3", "none"), default="v1",
                   help="vocabulary detokenized (v1: Mixtral-8x7B's; none: no detokenization) (default: v1)")
    p.add_argument("--stream", action="store_true",
                   help="build every running request's output each step, as a streaming server does "
                        "(default: finished requests only, as offline callers do)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="time phases in the engine thread's CPU time (steady on a shared machine, where other "
                        "processes' load lands in wall-clock phases) or in wall time (default: cpu)")
    p.add_argument("--profile", type=Path, default=None, metavar="OUT",
                   help="also run the last batch size under cProfile, write its stats to OUT and print the top "
                        "functions by own time")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON to OUT")


def build_engine(max_num_seqs: int, args: argparse.Namespace) -> Any:
    """An LLMEngine over a ``HostOnlyRunner`` with KV room for every running sequence (no preemption)."""
    from mixtral.engine.llm_engine import LLMEngine
    from mixtral.model.mixtral import Transformer
    from mixtral.model.presets import preset
    from mixtral.tokenizer import Tokenizer

    model_preset = "tiny" if args.tokenizer != "v1" else "tiny-v1"
    model = Transformer(preset(model_preset)).eval()  # its weights are never read
    tokenizer = Tokenizer.from_version(args.tokenizer) if args.tokenizer != "none" else None
    per_seq = -(-(args.input_len + args.output_len) // args.block_size)
    config = EngineConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
        max_model_len=args.input_len + args.output_len, num_kv_blocks=(max_num_seqs + 1) * per_seq + 16,
        enable_prefix_caching=not args.no_prefix_caching, async_scheduling=not args.no_async_scheduling,
        freeze_gc_heap=not args.no_freeze_gc_heap,
    )
    return LLMEngine(model, config, tokenizer, model_name=f"host-only ({model_preset})",
                     runner_factory=HostOnlyRunner)


def run_workload(engine: Any, args: argparse.Namespace, progress: bool) -> float:
    """Submit every request, step until all finish; returns the elapsed seconds."""
    requests = synthetic_requests(args.num_prompts, args.input_len, args.output_len, engine.model_args.vocab_size,
                                  seed=0)
    start = time.monotonic()
    for i, (prompt, out_len) in enumerate(requests):
        params = SamplingParams(temperature=args.temperature, max_tokens=out_len, ignore_eos=True, seed=i)
        engine.add_request(f"r{i}", prompt, params, arrival_time=start)
    bar = _progress(len(requests), engine.model_name) if progress else None
    done = 0
    try:
        while engine.has_unfinished_requests():
            outs = engine.step(finished_only=not args.stream)
            if bar is not None:
                finished = sum(1 for o in outs if o.finished)
                done += finished
                bar[0].advance(bar[1], finished)
    finally:
        if bar is not None:
            bar[0].stop()
    return time.monotonic() - start


def _warm_up(engine: Any) -> None:
    """One short request first: the first steps pay for lazy initialisation (torch ops, allocator), not work."""
    engine.add_request("warmup", list(range(1000, 1016)), SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    engine.reset_prefix_cache()


def measure(max_num_seqs: int, args: argparse.Namespace, progress: bool) -> dict[str, Any]:
    engine = build_engine(max_num_seqs, args)
    _warm_up(engine)
    before = engine.get_stats()
    timer = StepTimer.attach(engine, time.thread_time if args.clock == "cpu" else time.perf_counter)
    elapsed = run_workload(engine, args, progress)
    timer.close()
    stats = engine.get_stats()
    engine.shutdown()
    # "Full batch": within 10% of max_num_seqs (finishes and admissions keep it just below).
    decode = timer.decode_steps(int(0.9 * max_num_seqs))
    return {
        "max_num_seqs": max_num_seqs,
        "elapsed_s": elapsed,
        "steps": stats.num_steps - before.num_steps,
        "output_tokens": stats.num_generation_tokens - before.num_generation_tokens,
        "preemptions": stats.num_preemptions - before.num_preemptions,
        "all_steps_ms": timer.summary(),
        "decode_steps_ms": timer.summary(decode),
        "prefill_steps_ms": timer.summary(timer.prefill_steps()),
        "max_host_ms": 1000 * max((r.host for r in timer.records), default=0.0),
    }


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)  # the engine's host work is single-threaded; so is what it runs beside on a GPU host
    progress = sys.stderr.isatty()
    results = [measure(n, args, progress) for n in args.max_num_seqs]
    for res in results:
        _print(res)
    if args.profile is not None:
        _profile(args, progress)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if not callable(v)}
        args.json.write_text(json.dumps({"benchmark": "host_overhead", "config": config, "results": results},
                                        indent=2) + "\n")
    return 0


def _print(res: dict[str, Any]) -> None:
    decode, prefill, every = res["decode_steps_ms"], res["prefill_steps_ms"], res["all_steps_ms"]
    rows = [(phase, f"{decode[phase]:.3f} | {prefill[phase]:.3f} | {every[phase]:.3f}") for phase in PHASES
            if phase != "wait"]
    rows += [
        ("host ms / step", f"{decode['host']:.3f} | {prefill['host']:.3f} | {every['host']:.3f}"),
        ("  of which GC", f"{decode['gc']:.3f} | {prefill['gc']:.3f} | {every['gc']:.3f}"),
        ("steps", f"{decode['steps']:.0f} | {prefill['steps']:.0f} | {every['steps']:.0f}"),
        ("  launched ahead", f"{decode['ahead']:.0%} | {prefill['ahead']:.0%} | {every['ahead']:.0%}"),
        ("slowest step (host)", f"{res['max_host_ms']:.2f} ms"),
        ("run", f"{res['output_tokens']} tokens in {res['elapsed_s']:.1f} s, {res['preemptions']} preemptions"),
    ]
    print_table(f"host ms per step at max_num_seqs {res['max_num_seqs']}: full-batch decode | admitting | all",
                rows)


def _profile(args: argparse.Namespace, progress: bool) -> None:
    engine = build_engine(args.max_num_seqs[-1], args)
    _warm_up(engine)
    profiler = cProfile.Profile()
    profiler.enable()
    run_workload(engine, args, progress)
    profiler.disable()
    engine.shutdown()
    profiler.dump_stats(str(args.profile))
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
    print(out.getvalue())


def _progress(total: int, name: str) -> tuple[Any, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn(name), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True)
    progress.start()
    return progress, progress.add_task("requests", total=total)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mixtral.bench.host_overhead",
        description="The engine's host work per step (scheduling, input preparation, applying tokens, "
                    "detokenization, outputs) at large batches, by phase, with a model-free runner: whether the host "
                    "keeps up with a GPU step of T ms. GPU-only host costs: `mixtral bench throughput "
                    "--report-host-time`.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

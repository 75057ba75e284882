"""``mixtral bench throughput``: offline engine throughput and latency over N requests submitted at once.

Each request is either ``--input-len`` random token ids generating exactly ``--output-len`` tokens (EOS
ignored, so every run does the same work), or a line of ``--dataset`` (JSONL: ``{"prompt": str}`` or
``{"prompt_token_ids": [...]}``, optional ``"output_len"``). Reported: output tokens/s, total (prompt +
output) tokens/s, requests/s, time to first token (TTFT) and inter-token latency (ITL) at p50/p99, plus the
engine's preemptions and prefix-cache hit rate; ``--report-host-time`` adds where each step's time went (the
host's work by phase, its wait for the device: bench/host_timing.py). ``--json`` writes the same numbers with the
device, date and commit, for BENCHMARKS.md. It runs the bundled demo model by default (as every ``mixtral bench`` does);
point ``--model`` at a real model on a GPU. One warm-up request runs before the clock starts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mixtral.bench import cpu_compare
from mixtral.bench.args import fraction, non_negative_float, positive_int
from mixtral.bench.report import print_table
from mixtral.cli.kernel_args import add_kernel_args, kernel_config_from_args
from mixtral.cli.kv_args import add_kv_cache_args, kv_cache_kwargs
from mixtral.cli.parallel_args import add_parallel_args, parallel_engine_kwargs
from mixtral.cli.quant_args import add_quantization_arg, quantization_kwargs
from mixtral.defaults import DEFAULT_MODEL
from mixtral.sampling import DEFAULT_TEMPERATURE


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model folder, preset name, 'demo' or Hugging Face repo id (default: {DEFAULT_MODEL})")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--num-prompts", type=positive_int, default=64, help="number of requests (default: 64)")
    p.add_argument("--input-len", type=positive_int, default=128,
                   help="prompt length in tokens, synthetic mode (default: 128)")
    p.add_argument("--output-len", type=positive_int, default=64,
                   help="tokens generated per request; also the default for dataset lines without output_len "
                        "(default: 64)")
    p.add_argument("--dataset", type=Path, default=None, metavar="FILE",
                   help="JSONL file of prompts ({'prompt': ...} or {'prompt_token_ids': [...]}, optional "
                        "'output_len'); the first --num-prompts lines are used")
    p.add_argument("--temperature", type=non_negative_float, default=DEFAULT_TEMPERATURE,
                   help=f"sampling temperature; 0 is greedy (default: {DEFAULT_TEMPERATURE})")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the prompts, of preset weights and of sampling (default: 0)")
    p.add_argument("--max-num-seqs", type=positive_int, default=256,
                   help="sequences batched per step (default: 256)")
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=2048,
                   help="tokens per forward pass, the chunked-prefill budget (default: 2048)")
    p.add_argument("--max-model-len", type=positive_int, default=None,
                   help="longest sequence, prompt + output (default: the model's context length)")
    p.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV cache block (default: 16)")
    p.add_argument("--kv-cache-bytes", type=positive_int, default=None,
                   help="KV cache budget in bytes (default: on GPU a fraction of free memory, on CPU 1 GiB at most)")
    p.add_argument("--gpu-memory-utilization", type=fraction, default=0.9,
                   help="fraction of GPU memory the engine may use (default: 0.9)")
    add_kv_cache_args(p)
    p.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    p.add_argument("--enforce-eager", action="store_true", help="never use CUDA graphs")
    add_parallel_args(p)
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's own choice); 1 is fastest for tiny models on busy hosts")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON to OUT")
    add_quantization_arg(p)
    p.add_argument("--report-host-time", action="store_true",
                   help="also time the engine's host work per step by phase (scheduling, input preparation, "
                        "applying tokens, outputs...) and the time it waits for the device, and report the host's "
                        "share of the run (bench/host_timing.py; costs ~1 us per phase per step)")
    add_kernel_args(p)
    cpu_compare.add_arguments(p)  # --compare: CPU against transformers and llama.cpp on the same weights


@dataclass
class HostTimeResult:
    """Where each ``engine.step()`` of the run went, in mean milliseconds per step (``--report-host-time``)."""

    steps: int
    step_ms: float  # wall time of a step
    host_ms: float  # the host working: the step minus waiting for the device
    wait_ms: float  # the host blocked on the device (0 on the CPU)
    gc_ms: float  # garbage collections (inside host_ms)
    host_share: float  # host_ms / step_ms over the run
    launched_ahead: float  # share of steps that launched their successor before applying their own tokens
    phases_ms: dict[str, float]  # host_timing.PHASES, all steps
    decode_phases_ms: dict[str, float]  # the same over steps that launched only decode tokens


@dataclass
class ThroughputResult:
    num_requests: int
    elapsed_s: float
    prompt_tokens: int
    output_tokens: int
    requests_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    num_preemptions: int
    prefix_cache_hit_rate: float
    host_time: HostTimeResult | None = None


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def synthetic_requests(n: int, input_len: int, output_len: int, vocab_size: int, seed: int
                       ) -> list[tuple[list[int], int]]:
    """Random prompts of ordinary token ids (the first 1000 ids, control tokens among them, are avoided)."""
    rng = random.Random(seed)
    return [([rng.randrange(1000, vocab_size) for _ in range(input_len)], output_len) for _ in range(n)]


def dataset_requests(path: Path, n: int, default_output_len: int, tokenizer: Any, vocab_size: int | None = None
                     ) -> list[tuple[list[int], int]]:
    """The first ``n`` lines of a JSONL prompt file, tokenized. A line the engine could not take (no prompt, an
    empty one, ids outside ``vocab_size``, an output_len below 1) is a ``ValueError`` naming the file and line."""
    out: list[tuple[list[int], int]] = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if len(out) == n:
                break
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where} is not valid JSON: {exc}") from exc
            if not isinstance(item, dict):
                raise ValueError(f"{where} must be a JSON object, got {type(item).__name__}")
            if isinstance(item.get("prompt_token_ids"), list):
                ids = item["prompt_token_ids"]
                if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                    raise ValueError(f"{where}: 'prompt_token_ids' must be a list of integers")
                bad = [t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
                if bad:
                    raise ValueError(f"{where}: token ids {bad[:5]} are outside the vocabulary (size {vocab_size})")
            elif isinstance(item.get("prompt"), str):
                if tokenizer is None:
                    raise ValueError(f"{where}: a text prompt needs a tokenizer; this model has none "
                                     "(use 'prompt_token_ids')")
                ids = tokenizer.encode(item["prompt"], bos=True)
            else:
                raise ValueError(f"{where} needs a 'prompt' string or a 'prompt_token_ids' list")
            if not ids:
                raise ValueError(f"{where}: the prompt is empty")
            output_len = item.get("output_len", default_output_len)
            if not isinstance(output_len, int) or isinstance(output_len, bool) or output_len < 1:
                raise ValueError(f"{where}: 'output_len' must be a whole number >= 1, got {output_len!r}")
            out.append(([int(t) for t in ids], output_len))
    if not out:
        raise ValueError(f"{path} holds no prompts")
    return out


def run_benchmark(engine: Any, requests: list[tuple[list[int], int]], temperature: float, seed: int,
                  progress: bool, report_host_time: bool = False) -> ThroughputResult:
    """Submit every request at once, step the engine until all finish, and measure (with ``report_host_time``
    also each step's host work by phase)."""
    from mixtral.bench.host_timing import StepTimer
    from mixtral.sampling import SamplingParams

    timer = StepTimer.attach(engine) if report_host_time else None
    start = time.monotonic()
    for i, (prompt, out_len) in enumerate(requests):
        params = SamplingParams(temperature=temperature, max_tokens=out_len, ignore_eos=True, seed=seed + i)
        engine.add_request(f"bench-{i}", prompt, params, arrival_time=start)
    finished = []
    bar = _progress(len(requests)) if progress else None
    try:
        while engine.has_unfinished_requests():
            for out in engine.step(finished_only=True):
                if out.finished:
                    finished.append(out)
                    if bar is not None:
                        bar[0].advance(bar[1])
    finally:
        if bar is not None:
            bar[0].stop()
        if timer is not None:
            timer.close()
    elapsed = time.monotonic() - start
    stats = engine.get_stats()
    prompt_tokens = sum(len(o.prompt_token_ids) for o in finished)
    output_tokens = sum(len(c.token_ids) for o in finished for c in o.outputs)
    ttfts = [o.metrics.ttft for o in finished if o.metrics.ttft is not None]
    itls = [x for o in finished for x in o.metrics.inter_token_latencies]
    return ThroughputResult(
        num_requests=len(finished),
        elapsed_s=elapsed,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        requests_per_s=len(finished) / elapsed,
        output_tokens_per_s=output_tokens / elapsed,
        total_tokens_per_s=(prompt_tokens + output_tokens) / elapsed,
        ttft_p50_ms=1000 * percentile(ttfts, 50),
        ttft_p99_ms=1000 * percentile(ttfts, 99),
        itl_p50_ms=1000 * percentile(itls, 50),
        itl_p99_ms=1000 * percentile(itls, 99),
        num_preemptions=stats.num_preemptions,
        prefix_cache_hit_rate=stats.prefix_cache_hit_rate,
        host_time=_host_time(timer) if timer is not None else None,
    )


def _host_time(timer: Any) -> HostTimeResult:
    from mixtral.bench.host_timing import PHASES

    every = timer.summary()
    # Full-batch decode steps: no prompt tokens, at least 90% of the largest batch of the run.
    largest = max((r.num_scheduled for r in timer.records), default=0)
    decode = timer.summary(timer.decode_steps(int(0.9 * largest)))
    return HostTimeResult(
        steps=int(every["steps"]), step_ms=every["wall"], host_ms=every["host"], wait_ms=every["wait"],
        gc_ms=every["gc"], host_share=every["host"] / every["wall"] if every["wall"] else 0.0,
        launched_ahead=every["ahead"], phases_ms={p: every[p] for p in PHASES},
        decode_phases_ms={p: decode[p] for p in PHASES})


def run(args: argparse.Namespace) -> int:
    """Run the benchmark. A model that cannot load, an unreadable dataset or a request that can never fit
    (prompt longer than --max-model-len or the KV cache) is one line on stderr and status 2, not a traceback.
    Nonsensical numbers never get here: ``add_arguments``' types refuse them."""
    import torch

    from mixtral.cli.generate import check_device
    from mixtral.engine.llm_engine import LLMEngine, RequestTooLongError
    from mixtral.sampling import SamplingParams

    if getattr(args, "compare", False):
        return cpu_compare.run(args)
    if args.num_prompts < 1:  # also checked by argparse; run() may get a Namespace built in code
        return _fail(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        check_device(args.device)
        engine = LLMEngine.from_config(
            args.model, device=args.device, dtype=args.dtype, seed=args.seed, block_size=args.block_size,
            max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_bytes=args.kv_cache_bytes,
            gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=not args.no_prefix_caching,
            enforce_eager=args.enforce_eager, kernels=kernel_config_from_args(args),
            **parallel_engine_kwargs(args), **quantization_kwargs(args), **kv_cache_kwargs(args),
        )
    except (ValueError, FileNotFoundError, RuntimeError) as exc:  # CheckpointError/ConfigError are ValueErrors
        return _fail(f"cannot load {args.model!r}: {exc}")
    if args.dataset is not None:
        try:
            requests = dataset_requests(args.dataset, args.num_prompts, args.output_len, engine.tokenizer,
                                        engine.model_args.vocab_size)
        except (ValueError, OSError) as exc:  # OSError: a missing or unreadable file
            engine.shutdown()
            return _fail(f"--dataset: {exc}")
    else:
        requests = synthetic_requests(args.num_prompts, args.input_len, args.output_len,
                                      engine.model_args.vocab_size, args.seed)
    try:
        # Warm-up: first calls pay for lazy initialisation (kernels, allocator), not for serving.
        engine.add_request("warmup", requests[0][0][:16], SamplingParams(max_tokens=2, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
        engine.reset_prefix_cache()
        # The warm-up's prompt lookup must not count in the reported hit rate.
        engine.block_manager.prefix_queries = engine.block_manager.prefix_hits = 0
        result = run_benchmark(engine, requests, args.temperature, args.seed, progress=sys.stderr.isatty(),
                               report_host_time=getattr(args, "report_host_time", False))
    except RequestTooLongError as exc:  # raised by add_request for a prompt that can never fit
        engine.shutdown()
        where = "a --dataset prompt" if args.dataset is not None else f"--input-len {args.input_len}"
        return _fail(f"{where} cannot be served: {exc}")
    _print(result, engine)
    if args.json is not None:
        record = {"benchmark": "throughput", "results": asdict(result), "config": _config(args),
                  "environment": _environment(engine)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    engine.shutdown()
    return 0


def _fail(message: str) -> int:
    print(f"mixtral bench throughput: {message}", file=sys.stderr)
    return 2


def _print(r: ThroughputResult, engine: Any) -> None:
    rows = [
        ("requests", f"{r.num_requests} in {r.elapsed_s:.2f} s ({r.requests_per_s:.2f} req/s)"),
        ("output tokens/s", f"{r.output_tokens_per_s:,.1f}"),
        ("total tokens/s", f"{r.total_tokens_per_s:,.1f}  ({r.prompt_tokens} prompt + {r.output_tokens} output)"),
        ("TTFT p50 / p99", f"{r.ttft_p50_ms:,.1f} / {r.ttft_p99_ms:,.1f} ms"),
        ("ITL p50 / p99", f"{r.itl_p50_ms:,.2f} / {r.itl_p99_ms:,.2f} ms"),
        ("preemptions", str(r.num_preemptions)),
        ("prefix cache hit rate", f"{100 * r.prefix_cache_hit_rate:.1f}%"),
    ]
    h = r.host_time
    if h is not None:
        rows += [
            ("host time per step", f"{h.host_ms:.2f} of {h.step_ms:.2f} ms ({100 * h.host_share:.0f}%), waiting for "
                                   f"the device {h.wait_ms:.2f} ms, GC {h.gc_ms:.2f} ms; {h.steps} steps, "
                                   f"{100 * h.launched_ahead:.0f}% launched ahead"),
            ("host ms by phase (all | full-batch decode)",
             "  ".join(f"{p} {h.phases_ms[p]:.2f}|{h.decode_phases_ms[p]:.2f}" for p in h.phases_ms if p != "wait")),
        ]
    print_table(f"throughput: {engine.model_name} on {_device_name(engine)}", rows)


def _progress(total: int) -> tuple[Any, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("requests"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        transient=True)
    progress.start()
    return progress, progress.add_task("bench", total=total)


def _device_name(engine: Any) -> str:
    import torch

    device = engine.model.device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def _config(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")
            and not callable(v)}


def _environment(engine: Any) -> dict[str, Any]:
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False, cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        commit = None
    return {
        "device": _device_name(engine),
        "dtype": str(engine.model.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "num_kv_blocks": engine.block_manager.num_blocks,
    }

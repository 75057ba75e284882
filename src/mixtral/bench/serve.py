"""``mixtral bench serve``: HTTP load against ``mixtral serve``, and the server's overhead over the offline engine.

Each request is a ``/v1/completions`` stream whose prompt is ``--input-len`` random token ids and which generates
exactly ``--output-len`` tokens (``ignore_eos``), so every run does the same work. Load is either a fixed number of
clients (``--concurrency``) or Poisson arrivals (``--request-rate`` per second). Reported: request and token
throughput, time to first token (TTFT), inter-token latency (ITL) and end-to-end latency at p50/p99.

Without ``--url`` the benchmark starts the server itself (in this process, on a free 127.0.0.1 port) over
``--model``, then runs the same requests through an offline ``LLMEngine`` of the same model and settings, keeping
the same number in flight, and reports the server's overhead: how much longer the same work takes over HTTP.
The model is the bundled demo model unless ``--model`` says otherwise (as for every ``mixtral bench``); a few
warm-up requests run before either clock starts; the report is the table every benchmark prints.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

try:  # the openai SDK's HTTP client; plain httpx has the same API
    import httpx2 as httpx
except ImportError:  # pragma: no cover - depends on the environment
    import httpx  # type: ignore[no-redef]

from mixtral.bench.args import positive_float, positive_int
from mixtral.bench.report import print_table
from mixtral.defaults import DEFAULT_MODEL

# Requests run before timing (lazy initialisation, first-call compilation, allocator growth are not serving).
WARMUP_REQUESTS = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None,
                   help="root URL of a running server, e.g. http://127.0.0.1:8000 (default: start one in-process "
                        "over --model and also measure the offline engine for the overhead)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="model to serve when no --url is given, and the model id sent in requests (default: tiny, "
                        "random weights)")
    p.add_argument("--served-model-name", default=None,
                   help="model id to send (default: the id the server lists first at /v1/models)")
    p.add_argument("--api-key", default=None, help="API key for a server started with --api-key")
    p.add_argument("--num-requests", type=positive_int, default=64, help="requests to send (default: 64)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=positive_int, default=8,
                      help="clients, each sending its next request when the last one ends (default: 8)")
    load.add_argument("--request-rate", type=positive_float, default=None,
                      help="Poisson arrivals at this many requests per second instead of fixed clients")
    p.add_argument("--input-len", type=positive_int, default=64, help="prompt length in tokens (default: 64)")
    p.add_argument("--output-len", type=positive_int, default=32, help="tokens generated per request (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and arrivals (default: 0)")
    p.add_argument("--device", default=None, help="device of the in-process server (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="dtype of the in-process server (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--max-num-seqs", type=positive_int, default=64,
                   help="the in-process engine's batch size limit (default: 64)")
    p.add_argument("--kv-cache-bytes", type=positive_int, default=None,
                   help="the in-process engine's KV cache budget in bytes (default: the engine's)")
    p.add_argument("--no-offline", action="store_true",
                   help="skip the offline-engine comparison when starting the server in-process")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def make_prompts(n: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Random prompts of ordinary token ids (control ids 0..999 avoided: they would mean something)."""
    rng = random.Random(seed)
    return [[rng.randrange(1000, vocab_size) for _ in range(input_len)] for _ in range(n)]


async def _one_request(client: Any, model: str, prompt: list[int], output_len: int) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "ignore_eos": True, "temperature": 0.0,
            "stream": True}
    start = time.perf_counter()
    last = start
    result = RequestResult(ok=False)
    finished = False
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                result.error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk and "choices" not in chunk:
                    result.error = str(chunk["error"])
                    return result
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                choices = chunk.get("choices", [])
                # Each chunk before the finish is one engine step, even one whose token shows no text yet (part
                # of a character spelled by several byte tokens): timing only chunks with text would merge gaps.
                if choices and not finished:
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last = now
                finished = finished or any(c.get("finish_reason") for c in choices)
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - start
    result.ok = result.error == ""
    return result


async def run_load(url: str, model: str, prompts: list[list[int]], output_len: int, concurrency: int | None,
                   request_rate: float | None, seed: int, api_key: str | None = None,
                   progress: Any = None) -> tuple[list[RequestResult], float]:
    """Send every prompt; returns the results and the wall time of the whole run."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max(concurrency or 0, 256), max_keepalive_connections=256)
    results: list[RequestResult] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:
        start = time.perf_counter()

        async def run(prompt: list[int]) -> None:
            results.append(await _one_request(client, model, prompt, output_len))
            if progress is not None:
                progress()

        if request_rate is not None:
            rng = random.Random(seed + 1)
            tasks = []
            for prompt in prompts:
                tasks.append(asyncio.create_task(run(prompt)))
                await asyncio.sleep(rng.expovariate(request_rate))
            await asyncio.gather(*tasks)
        else:
            queue = list(reversed(prompts))

            async def worker() -> None:
                while queue:
                    await run(queue.pop())

            await asyncio.gather(*(worker() for _ in range(min(concurrency or 1, len(prompts)))))
        return results, time.perf_counter() - start


def summarize(results: list[RequestResult], wall: float, input_len: int) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    itls = [x for r in ok for x in r.itls]
    return {
        "requests": len(results), "failed": len(results) - len(ok), "wall_s": wall,
        "request_throughput": len(ok) / wall if wall else 0.0,
        "output_tokens_per_s": out_tokens / wall if wall else 0.0,
        "total_tokens_per_s": (out_tokens + input_len * len(ok)) / wall if wall else 0.0,
        "ttft_p50_ms": 1e3 * percentile([r.ttft for r in ok], 50),
        "ttft_p99_ms": 1e3 * percentile([r.ttft for r in ok], 99),
        "itl_p50_ms": 1e3 * percentile(itls, 50), "itl_p99_ms": 1e3 * percentile(itls, 99),
        "e2e_p50_ms": 1e3 * percentile([r.latency for r in ok], 50),
        "e2e_p99_ms": 1e3 * percentile([r.latency for r in ok], 99),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
    }


def run_offline(llm: Any, prompts: list[list[int]], output_len: int, in_flight: int) -> float:
    """Wall time of the same requests on the offline engine, keeping ``in_flight`` of them running.

    Runs on a worker thread, as the server's AsyncEngine does: on CPU, torch parallelises differently on the main
    thread (an OpenMP team) than on other threads, which on a busy machine changed step times by over 10x, and
    the comparison must measure the server, not that.
    """
    result: list[float] = []
    worker = threading.Thread(target=lambda: result.append(_offline_loop(llm, prompts, output_len, in_flight)))
    worker.start()
    worker.join()
    if not result:
        raise RuntimeError("the offline engine run failed (see the traceback above)")
    return result[0]


def _offline_loop(llm: Any, prompts: list[list[int]], output_len: int, in_flight: int) -> float:
    from mixtral.sampling import SamplingParams

    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
    for i, prompt in enumerate(prompts[:WARMUP_REQUESTS]):  # warm-up, untimed
        llm.add_request(f"warmup-{i}", prompt, SamplingParams(max_tokens=min(output_len, 4), ignore_eos=True))
    while llm.has_unfinished_requests():
        llm.step()
    pending = list(reversed(prompts))
    running = 0
    start = time.perf_counter()
    while pending or llm.has_unfinished_requests():
        while pending and running < in_flight:
            llm.add_request(f"offline-{len(pending)}", pending.pop(), params)
            running += 1
        for out in llm.step():
            running -= int(out.finished)
    return time.perf_counter() - start


def _progress(total: int) -> tuple[Any, Any]:
    """(callback per finished request, progress object to stop) — a rich bar on a terminal, else nothing."""
    if not sys.stderr.isatty():
        return None, None
    from rich.progress import Progress

    bar = Progress(transient=True)
    task = bar.add_task("requests", total=total)
    bar.start()
    return (lambda: bar.advance(task)), bar


def _print_report(summary: dict[str, Any], offline_s: float | None, title: str) -> None:
    rows = [
        ("requests", f"{summary['requests']} ({summary['failed']} failed) in {summary['wall_s']:.2f} s "
                     f"({summary['request_throughput']:.2f} req/s)"),
        ("output tokens/s", f"{summary['output_tokens_per_s']:,.1f}"),
        ("total tokens/s", f"{summary['total_tokens_per_s']:,.1f}"),
    ]
    for name in ("ttft", "itl", "e2e"):
        rows.append((f"{name.upper()} p50 / p99", f"{summary[f'{name}_p50_ms']:,.1f} / "
                                                  f"{summary[f'{name}_p99_ms']:,.1f} ms"))
    if offline_s is not None:
        rows.append(("offline engine, same work", f"{offline_s:.2f} s (server overhead "
                                                  f"{100 * (summary['wall_s'] / offline_s - 1):+.1f}%)"))
    print_table(title, rows)
    for error in summary["errors"]:
        print(f"error: {error}")


def run(args: argparse.Namespace) -> int:
    # argparse's types refuse these already; run() may also get a Namespace built in code.
    for name in ("num_requests", "input_len", "output_len", "concurrency", "max_num_seqs", "kv_cache_bytes"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            print(f"mixtral bench serve: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}",
                  file=sys.stderr)
            return 2
    if args.request_rate is not None and not args.request_rate > 0:  # also refuses NaN
        print(f"mixtral bench serve: --request-rate must be > 0 requests per second, got {args.request_rate}",
              file=sys.stderr)
        return 2
    server = None
    llm = None
    if args.url is None:
        from mixtral.cli.generate import check_device
        from mixtral.serve.inprocess import InProcessServer

        try:
            check_device(args.device)
            server = InProcessServer(args.model, device=args.device, dtype=args.dtype,
                                     max_num_seqs=args.max_num_seqs, kv_cache_bytes=args.kv_cache_bytes)
        except (ValueError, FileNotFoundError, RuntimeError) as exc:  # CheckpointError/ConfigError: ValueErrors
            print(f"mixtral bench serve: cannot load {args.model!r}: {exc}", file=sys.stderr)
            return 2
        server.start()
        url = server.url
    else:
        url = args.url.rstrip("/")
    try:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        try:
            resp = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
        except httpx.HTTPError as exc:
            print(f"mixtral bench serve: cannot reach the server at {url}: {exc}", file=sys.stderr)
            return 2
        if resp.status_code != 200:
            print(f"mixtral bench serve: GET {url}/v1/models answered HTTP {resp.status_code}: {resp.text[:200]}",
                  file=sys.stderr)
            return 2
        card = resp.json()["data"][0]
        model = args.served_model_name or card["id"]
        vocab = server.llm.model_args.vocab_size if server else 32000
        prompts = make_prompts(args.num_requests, args.input_len, vocab, args.seed)
        # Warm-up, untimed: the server's first requests pay for lazy initialisation.
        asyncio.run(run_load(url, model, prompts[:WARMUP_REQUESTS], min(args.output_len, 4), 1, None, args.seed,
                             args.api_key, None))
        callback, bar = _progress(args.num_requests)
        try:
            results, wall = asyncio.run(run_load(url, model, prompts, args.output_len,
                                                 None if args.request_rate else args.concurrency, args.request_rate,
                                                 args.seed, args.api_key, callback))
        finally:
            if bar is not None:
                bar.stop()
    finally:
        if server is not None:
            server.stop()
    summary = summarize(results, wall, args.input_len)
    offline_s = None
    if server is not None and not args.no_offline:
        llm = server.build_engine()
        in_flight = args.num_requests if args.request_rate else args.concurrency
        offline_s = run_offline(llm, prompts, args.output_len, in_flight)
        summary["offline_wall_s"] = offline_s
        summary["server_overhead_pct"] = 100 * (wall / offline_s - 1)
    _print_report(summary, offline_s, f"serve: {model} at {url}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, **summary,
                       "results": [asdict(r) for r in results]}, f, indent=1, default=str)
    return 0 if summary["failed"] == 0 else 1

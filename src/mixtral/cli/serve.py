"""``mixtral serve [MODEL]``: the Mistral- and OpenAI-compatible HTTP server (see ``mixtral.serve.app``)."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mixtral.cli.parallel_args import add_parallel_args, parallel_engine_kwargs, run_torchrun_worker_if_rank
from mixtral.defaults import DEFAULT_MODEL

if TYPE_CHECKING:
    from mixtral.engine.llm_engine import LLMEngine


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve",
        help="serve a model over a Mistral- and OpenAI-compatible HTTP API",
        description="Serve MODEL over HTTP with the Mistral API (/v1/chat/completions, /v1/models, ...) and its "
                    "OpenAI-compatible form, so the mistralai and openai SDKs work unmodified. Function calling "
                    "uses the model's native [TOOL_CALLS] format (v3-tokenizer models); /metrics serves Prometheus "
                    "metrics including expert utilization. SIGTERM drains running requests, then exits.",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL",
                   help=f"model folder (Hugging Face or Mistral format), preset name (random weights, e.g. 'tiny'), "
                        f"Hugging Face repo id, or 'demo' (default: {DEFAULT_MODEL})")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; use 0.0.0.0 to accept connections from other machines (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default: 8000)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients send and /v1/models lists (default: MODEL as given). Models with the "
                        "shape of Mixtral-8x7B / 8x22B also answer to open-mixtral-8x7b / open-mixtral-8x22b")
    p.add_argument("--alias", action="append", default=[], metavar="NAME",
                   help="another model id this server answers to; repeat for several")
    p.add_argument("--api-key", default=os.environ.get("MIXTRAL_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $MIXTRAL_API_KEY, else no key)")
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="torch device to run on, e.g. 'cuda', 'cuda:1', 'cpu' (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"],
                   help="weight and activation dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help="longest sequence (prompt + output) in tokens (default: the model's context length)")
    p.add_argument("--max-num-seqs", type=int, default=256, metavar="N",
                   help="most sequences decoded together in one step (default: 256)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, metavar="N",
                   help="most tokens one forward pass processes; longer prompts are prefilled in chunks "
                        "(default: 2048)")
    p.add_argument("--kv-cache-bytes", type=int, default=None, metavar="BYTES",
                   help="KV cache budget in bytes (default: a fraction of free GPU memory; 1 GiB on CPU)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, metavar="F",
                   help="fraction of GPU memory the engine may use for weights, activations and KV (default: 0.9)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="never capture CUDA graphs for decode steps (debugging; slower at small batches)")
    p.add_argument("--no-async-scheduling", action="store_true",
                   help="wait for each step's tokens before launching the next (default on CUDA: launch the next "
                        "decode step first, so host work overlaps the GPU)")
    p.add_argument("--max-queued-requests", type=int, default=None, metavar="N",
                   help="requests allowed to wait for their first token; more get 429 with Retry-After "
                        "(default: unlimited)")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, metavar="BYTES",
                   help="largest request body accepted; larger ones get 413 (default: 4194304 = 4 MiB)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, how long running requests may take to finish before they are aborted "
                        "(default: 30)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for random weights (presets) and for requests that bring no seed (default: 0)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level (default: info)")
    p.add_argument("--lora", type=Path, default=None, metavar="PATH",
                   help="LoRA adapter folder (from `mixtral train --lora-rank`) merged into the weights at load")
    p.add_argument("--no-access-log", action="store_true", help="do not log one line per HTTP request")
    add_parallel_args(p, server=True)
    return p


def _check(args: argparse.Namespace) -> str | None:
    if not 0 < args.port < 65536:
        return f"--port must be in 1..65535, got {args.port}"
    for name in ("max_num_seqs", "max_num_batched_tokens", "max_body_bytes"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
    if args.max_queued_requests is not None and args.max_queued_requests < 0:
        return f"--max-queued-requests must be >= 0, got {args.max_queued_requests}"
    if args.drain_timeout < 0:
        return f"--drain-timeout must be >= 0, got {args.drain_timeout}"
    return None


def load_engine(args: argparse.Namespace) -> LLMEngine:
    """The engine ``mixtral serve`` runs: the model, with a LoRA adapter merged into its weights if asked."""
    from mixtral.engine.llm_engine import LLMEngine

    engine_kwargs = dict(
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_bytes=args.kv_cache_bytes,
        gpu_memory_utilization=args.gpu_memory_utilization, seed=args.seed,
        enforce_eager=getattr(args, "enforce_eager", False),
        async_scheduling=False if getattr(args, "no_async_scheduling", False) else None,
    )
    parallel = parallel_engine_kwargs(args)
    if args.lora is None:
        return LLMEngine.from_config(args.model, device=args.device, dtype=args.dtype, **engine_kwargs, **parallel)
    if parallel:
        raise ValueError("--lora merges the adapter into one process's weights; to serve it with "
                         "--tensor-parallel-size, save the merged model as a checkpoint and serve that")
    from mixtral.engine.loading import load_for_engine
    from mixtral.train.lora import merge_lora_into

    model, tokenizer, _ = load_for_engine(args.model, args.device, args.dtype, seed=args.seed)
    merge_lora_into(model, args.lora)
    return LLMEngine.from_config(model, tokenizer=tokenizer, **engine_kwargs)


def run(args: argparse.Namespace) -> int:
    problem = _check(args)
    if problem:
        print(f"mixtral serve: {problem}", file=sys.stderr)
        return 2
    run_torchrun_worker_if_rank(args)  # torchrun ranks > 0 follow rank 0 and exit here
    import logging

    from mixtral.serve.server import bind_socket

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The address first: loading a real model takes minutes, and a port that is taken must not cost them. The
    # socket stays bound through the load (no other process can take the port meanwhile) and uvicorn serves on it.
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        print(f"mixtral serve: {exc.strerror or exc}", file=sys.stderr)
        return 1
    with sock:
        return _load_and_serve(args, sock)


def _load_and_serve(args: argparse.Namespace, sock: socket.socket) -> int:
    """Load the model and serve it on ``sock`` (already bound to --host:--port) until a signal drains it."""
    from mixtral.engine.async_engine import AsyncEngine
    from mixtral.serve.app import create_app
    from mixtral.serve.server import make_server
    from mixtral.serve.state import ServerSettings

    try:
        llm = load_engine(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # RuntimeError: a KV cache budget too small for one max_model_len sequence, an unusable device, ...
        print(f"mixtral serve: cannot load {args.model!r}: {exc}", file=sys.stderr)
        return 1
    # Admission (429) is the server's: it counts requests waiting for their first token (see serve/state.py).
    engine = AsyncEngine(llm)
    settings = ServerSettings(api_key=args.api_key or None, max_queued_requests=args.max_queued_requests,
                              max_body_bytes=args.max_body_bytes, drain_timeout=args.drain_timeout)
    app = create_app(engine, served_model_name=args.served_model_name or args.model, settings=settings,
                     aliases=args.alias)
    server = make_server(app, host=args.host, port=args.port, drain_timeout=args.drain_timeout,
                         log_level=args.log_level, access_log=not args.no_access_log)
    server.run(sockets=[sock])
    return 0

"""``mixtral serve [MODEL]``: the Mistral- and OpenAI-compatible HTTP server (see ``mixtral.serve.app``).

vLLM's ``serve`` flags are accepted where the meaning is the same (``--model``, ``--dtype auto|half|...``,
``--enable-prefix-caching``, ``--block-size``, ``--tokenizer``, ``--allowed-origins``, ...); the ones that choose
something this server always does (``--tokenizer-mode mistral``, ``--enable-auto-tool-choice``,
``--tool-call-parser mistral``: tools are always native) are accepted and change nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixtral.cli.kernel_args import add_kernel_args, kernel_config_from_args
from mixtral.cli.kv_args import add_kv_cache_args, kv_cache_kwargs
from mixtral.cli.parallel_args import add_parallel_args, parallel_engine_kwargs, run_torchrun_worker_if_rank
from mixtral.cli.quant_args import add_quantization_arg, quantization_kwargs
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
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help=f"model folder (Hugging Face or Mistral format), preset name (random weights, e.g. 'tiny'), "
                        f"Hugging Face repo id, or 'demo' (default: {DEFAULT_MODEL})")
    p.add_argument("--model", dest="model_flag", default=None, metavar="MODEL",
                   help="the same as the MODEL argument (vLLM's spelling)")
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
    p.add_argument("--dtype", default="auto",
                   choices=["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "half"],
                   help="weight and activation dtype; auto is bfloat16 on GPU, float32 on CPU (default: auto)")
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
    add_kv_cache_args(p)
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
    # Robustness limits (slow clients, stalled streams, constrained-decoding cost).
    p.add_argument("--read-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="time a client has to send a request's headers, and then again its body; slower clients "
                        "are dropped (the body's timeout is answered 408) (default: 30)")
    p.add_argument("--stall-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long a stream may wait on a client that stopped reading before it is aborted and its KV "
                        "blocks freed (default: 30)")
    p.add_argument("--guided-cache-bytes", type=int, default=128 * 1024 * 1024, metavar="BYTES",
                   help="memory for compiled constrained-decoding grammars (tools, response_format) kept for reuse, "
                        "least recently used dropped first; 0 disables the cache (default: 134217728 = 128 MiB)")
    p.add_argument("--max-guided-schema-bytes", type=int, default=512 * 1024, metavar="BYTES",
                   help="largest JSON schema (a tool's parameters or a response_format schema, as compact JSON) a "
                        "request may ask to enforce; larger ones get 400 (default: 524288 = 512 KiB)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for random weights (presets) and for requests that bring no seed (default: 0)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level (default: info)")
    p.add_argument("--lora", type=Path, default=None, metavar="PATH",
                   help="LoRA adapter merged into the weights at load: the output folder of `mixtral train "
                        "--lora-rank R --output-dir PATH` (its adapter/, else its latest checkpoint), or an adapter "
                        "folder; it must be trained on this base model")
    p.add_argument("--no-access-log", action="store_true", help="do not log one line per HTTP request")
    add_quantization_arg(p)
    add_kernel_args(p)
    _add_vllm_arguments(p)
    p.add_argument("--no-ui", action="store_true",
                   help="do not serve the web page (chat playground and live expert-routing dashboard) at /; the "
                        "API, including GET /v1/stats, is unchanged")
    add_parallel_args(p, server=True)
    return p


def _add_vllm_arguments(p: argparse.ArgumentParser) -> None:
    """vLLM's serve flags that mean the same here."""
    v = p.add_argument_group("vLLM-compatible options")
    v.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV cache of prompts that share a prefix (default: on)")
    v.add_argument("--block-size", type=int, default=16, choices=[8, 16, 32, 64, 128],
                   help="tokens per KV cache block (default: 16)")
    v.add_argument("--tokenizer", type=Path, default=None, metavar="PATH",
                   help="tokenizer file (tokenizer.model.v1 / .v3 / tokenizer.model) or a folder holding one, "
                        "instead of the model's own")
    v.add_argument("--tokenizer-mode", default="auto", choices=["auto", "mistral"],
                   help="accepted for vLLM's command lines: the tokenizer is always mistral-common's (default: auto)")
    v.add_argument("--allowed-origins", default=None, metavar="ORIGINS",
                   help="allow browser requests (CORS) from these origins: a JSON list like '[\"*\"]' or "
                        "comma-separated URLs (default: none, CORS off)")
    v.add_argument("--disable-log-requests", action="store_true",
                   help="do not log one line per request (the same as --no-access-log)")
    v.add_argument("--uvicorn-log-level", default=None,
                   choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="log level of the HTTP server (uvicorn) alone (default: --log-level)")
    v.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted for vLLM's command lines: tool calls are always parsed here (native format)")
    v.add_argument("--tool-call-parser", default=None, choices=["mistral"],
                   help="accepted for vLLM's command lines: Mixtral's tool calls are always read in Mistral's "
                        "native [TOOL_CALLS] format")


def allowed_origins(text: str | None) -> list[str] | None:
    """``--allowed-origins``: a JSON list or comma-separated origins; None when not given."""
    if text is None:
        return None
    text = text.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--allowed-origins {text!r} is not a JSON list: {exc}") from None
        if not isinstance(value, list) or not all(isinstance(o, str) and o for o in value):
            raise ValueError(f"--allowed-origins must list origins as strings, got {text!r}")
        return value
    origins = [o.strip() for o in text.split(",") if o.strip()]
    if not origins:
        raise ValueError("--allowed-origins is empty; leave it out to keep CORS off")
    return origins


def model_name(args: argparse.Namespace) -> str:
    """MODEL or --model (the default model when neither is given)."""
    return args.model or getattr(args, "model_flag", None) or DEFAULT_MODEL


def load_tokenizer(path: Path | None) -> Any:
    """``--tokenizer``: a tokenizer file, or a folder holding one (None when not given)."""
    if path is None:
        return None
    from mixtral.tokenizer import Tokenizer

    if path.is_dir():
        for name in ("tokenizer.model.v3", "tokenizer.model.v1", "tokenizer.model"):
            if (path / name).is_file():
                return Tokenizer.from_file(path / name)
        raise FileNotFoundError(f"--tokenizer {path}: no tokenizer.model.v1 / .v3 / tokenizer.model in it")
    return Tokenizer.from_file(path)


def _check(args: argparse.Namespace) -> str | None:
    if args.model and getattr(args, "model_flag", None) and args.model != args.model_flag:
        return f"MODEL ({args.model!r}) and --model ({args.model_flag!r}) disagree; give one"
    try:
        allowed_origins(getattr(args, "allowed_origins", None))
    except ValueError as exc:
        return str(exc)
    if not 0 < args.port < 65536:
        return f"--port must be in 1..65535, got {args.port}"
    for name in ("max_num_seqs", "max_num_batched_tokens", "max_body_bytes"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
    if args.max_queued_requests is not None and args.max_queued_requests < 0:
        return f"--max-queued-requests must be >= 0, got {args.max_queued_requests}"
    if args.drain_timeout < 0:
        return f"--drain-timeout must be >= 0, got {args.drain_timeout}"
    for name in ("read_timeout", "stall_timeout"):
        if not getattr(args, name, 1.0) > 0:
            return f"--{name.replace('_', '-')} must be > 0 seconds, got {getattr(args, name)}"
    if getattr(args, "guided_cache_bytes", 0) < 0:
        return f"--guided-cache-bytes must be >= 0, got {args.guided_cache_bytes}"
    if getattr(args, "max_guided_schema_bytes", 1) < 1:
        return f"--max-guided-schema-bytes must be >= 1, got {args.max_guided_schema_bytes}"
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
        kernels=kernel_config_from_args(args), **kv_cache_kwargs(args),
        block_size=getattr(args, "block_size", 16),
        enable_prefix_caching=getattr(args, "enable_prefix_caching", True),
        **quantization_kwargs(args),
    )
    name = model_name(args)
    dtype = None if args.dtype in (None, "auto") else args.dtype
    tokenizer = load_tokenizer(getattr(args, "tokenizer", None))
    if args.lora is not None and getattr(args, "quantization", None) is not None:
        raise ValueError(f"--lora merges an adapter into bf16 weights; it cannot be merged into --quantization "
                         f"{args.quantization} weights. Merge it first (mixtral train's merged model, or serve "
                         "without --quantization), then quantize the merged checkpoint")
    parallel = parallel_engine_kwargs(args)
    if args.lora is None:
        llm = LLMEngine.from_config(name, device=args.device, dtype=dtype, tokenizer=tokenizer, **engine_kwargs,
                                    **parallel)
        _check_tokenizer(llm)
        return llm
    import logging
    if parallel:
        raise ValueError("--lora merges the adapter into one process's weights; to serve it with "
                         "--tensor-parallel-size, save the merged model as a checkpoint and serve that")
    from mixtral.engine.loading import load_for_engine
    from mixtral.train.lora import find_adapter, merge_lora_into

    adapter = find_adapter(args.lora)  # before the (long) load: a wrong path fails at once
    model, tokenizer, _ = load_for_engine(name, args.device, dtype, tokenizer, seed=args.seed,
                                          max_model_len=args.max_model_len)
    from mixtral.model.quantized import quant_scheme

    if quant_scheme(model) is not None:  # a pre-quantized checkpoint: no bf16 weights to merge into
        raise ValueError(f"--lora merges an adapter into bf16 weights, but {name} is a {quant_scheme(model)} "
                         "checkpoint; merge the adapter into the bf16 base, then quantize that")
    config = merge_lora_into(model, adapter)
    logging.getLogger("mixtral.serve").info(
        "LoRA adapter %s merged (rank %d, alpha %g, targets %s)%s", adapter, config.rank, config.alpha,
        ",".join(config.targets), f" from training run {args.lora}" if adapter != args.lora else "")
    llm = LLMEngine.from_config(model, tokenizer=tokenizer, **engine_kwargs)
    _check_tokenizer(llm)
    return llm


def _check_tokenizer(llm: LLMEngine) -> None:
    """A --tokenizer with more ids than the model has rows would index past its embedding table."""
    tok, vocab = llm.tokenizer, llm.model_args.vocab_size
    if tok is not None and tok.vocab_size > vocab:
        llm.shutdown()
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the model's vocabulary is {vocab}: they do not "
                         f"belong together (--tokenizer)")


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
    from mixtral.serve.guide_compiler import GuideLimits
    from mixtral.serve.server import make_server
    from mixtral.serve.state import ServerSettings

    try:
        llm = load_engine(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # RuntimeError: a model or KV cache that does not fit the device's memory, an unusable device, ...
        print(f"mixtral serve: cannot load {model_name(args)!r}: {exc}", file=sys.stderr)
        return 1
    # Admission (429) is the server's: it counts requests waiting for their first token (see serve/state.py).
    engine = AsyncEngine(llm)
    settings = ServerSettings(api_key=args.api_key or None, max_queued_requests=args.max_queued_requests,
                              max_body_bytes=args.max_body_bytes, drain_timeout=args.drain_timeout,
                              read_timeout=args.read_timeout, stall_timeout=args.stall_timeout,
                              guide_limits=GuideLimits(cache_bytes=args.guided_cache_bytes,
                                                       max_schema_bytes=args.max_guided_schema_bytes),
                              ui=not args.no_ui)
    app = create_app(engine, served_model_name=args.served_model_name or model_name(args), settings=settings,
                     aliases=args.alias, allowed_origins=allowed_origins(getattr(args, "allowed_origins", None)))
    quiet = args.no_access_log or getattr(args, "disable_log_requests", False)
    server = make_server(app, host=args.host, port=args.port, drain_timeout=args.drain_timeout,
                         log_level=getattr(args, "uvicorn_log_level", None) or args.log_level, access_log=not quiet)
    server.run(sockets=[sock])
    return server.exit_code  # 1 when the engine died: a supervisor restarts the server

"""A tensor-parallel driver process for the fault tests: ``python tp_driver.py MODE CHECKPOINT [--exit-on-failure]``.

Starts a TP 2 group over CHECKPOINT (CPU, gloo), prints one JSON line ``{"pid": ..., "workers": [...], ...}``
and then, by MODE:

- ``idle``: waits (a group with nothing to do);
- ``steps``: generates forever (a kill lands mid-step);
- ``forward``: after a line on stdin, runs dense forwards of 2048 tokens (256 MiB of logits per rank) forever;
- ``serve``: serves the engine over HTTP on 127.0.0.1 (the JSON has the port), as ``mixtral serve`` does, with
  SIGTERM draining it.

``AsyncEngine.is_running`` reports the executor's health (the parallel runner's ``healthy``), so ``/health``
turns 503 when a worker dies.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from mixtral.distributed.config import ParallelConfig
from mixtral.distributed.engine import build_parallel_engine
from mixtral.distributed.errors import WorkerFailedError
from mixtral.engine.async_engine import AsyncEngine
from mixtral.engine.llm_engine import LLMEngine
from mixtral.sampling import SamplingParams


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("idle", "steps", "forward", "serve"))
    p.add_argument("checkpoint")
    p.add_argument("--exit-on-failure", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    parallel = ParallelConfig(2, collective_timeout_s=60, exit_on_worker_failure=args.exit_on_failure)
    engine = build_parallel_engine(LLMEngine, args.checkpoint, parallel, device="cpu", dtype="fp32",
                                   max_model_len=256, num_kv_blocks=64, max_num_seqs=4)
    ex = engine.model_runner.executor
    info = {"pid": __import__("os").getpid(), "workers": ex.worker_pids}
    if args.mode == "serve":
        from mixtral.serve.app import create_app
        from mixtral.serve.inprocess import free_port
        from mixtral.serve.server import make_server

        port = free_port()
        app = create_app(AsyncEngine(engine), served_model_name="tiny-tp")
        server = make_server(app, host="127.0.0.1", port=port, drain_timeout=5, log_level="warning",
                             access_log=False)
        print(json.dumps({**info, "port": port}), flush=True)
        server.run()
        return 0
    print(json.dumps(info), flush=True)
    if args.mode == "idle":
        while True:
            time.sleep(1)
    if args.mode == "forward":
        sys.stdin.readline()
        ids = torch.randint(10, 32768, (4, 512), generator=torch.Generator().manual_seed(0))
        while True:
            ex.forward(ids)
    i = 0
    try:
        while True:
            engine.add_request(f"r{i}", list(range(100, 140)), SamplingParams(max_tokens=30, ignore_eos=True))
            i += 1
            while engine.has_unfinished_requests():
                engine.step()
    except WorkerFailedError:
        print(f"raised at {time.time():.3f}", file=sys.stderr, flush=True)
        raise


if __name__ == "__main__":
    sys.exit(main())

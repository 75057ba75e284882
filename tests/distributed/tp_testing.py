"""Helpers of the tensor-parallel tests (a plain module; fixtures are in conftest.py).

``LAYOUTS`` are the parallel layouts the tests run; ``child_pids`` lists the live child processes of this
process, for the orphan checks; ``mixed_requests`` / ``run_requests`` / ``token_ids`` run one request mix on an
engine (parallel or not) for comparison.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from step_testing import run_to_completion

from mixtral.distributed.config import ParallelConfig
from mixtral.engine.llm_engine import LLMEngine
from mixtral.engine.outputs import RequestOutput
from mixtral.sampling import SamplingParams

# Short timeouts: a test that hangs must fail within a minute, not wait five.
LAYOUTS = {
    "tp2": ParallelConfig(2, collective_timeout_s=60),
    "ep2": ParallelConfig(2, enable_expert_parallel=True, collective_timeout_s=60),
    "tp2xep2": ParallelConfig(4, expert_parallel_size=2, collective_timeout_s=60),
}


def child_pids() -> set[int]:
    """Live (not zombie) children of this process, from /proc."""
    me = os.getpid()
    out = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after the last ')'
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == me and state != "Z":
            out.add(int(entry.name))
    return out


def assert_reaped(pids: set[int], timeout: float = 10.0) -> None:
    """Every pid in ``pids`` is gone within ``timeout``; otherwise kill them and fail, naming them."""
    deadline = time.monotonic() + timeout
    left = pids & child_pids()
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = pids & child_pids()
    if left:
        import signal

        for pid in left:
            os.kill(pid, signal.SIGKILL)
        pytest.fail(f"child processes {sorted(left)} were still running {timeout:.0f}s after the test")


def mixed_requests(vocab: int = 32768) -> list[tuple[list[int], SamplingParams]]:
    """24 requests: prompts of 3 to 90 tokens (8 share a 40-token prefix, so the prefix cache hits), greedy and
    seeded-random rows, n = 2, stop tokens, prompt logprobs and top logprobs."""
    import torch

    gen = torch.Generator().manual_seed(21)
    prefix = torch.randint(10, vocab, (40,), generator=gen).tolist()
    requests = []
    for i in range(24):
        n_tok = int(torch.randint(3, 91, (1,), generator=gen))
        prompt = torch.randint(10, vocab, (n_tok,), generator=gen).tolist()
        if i % 3 == 0:
            prompt = prefix + prompt[:20]
        max_tokens = 4 + i % 13
        if i % 4 == 1:
            params = SamplingParams(temperature=0.9, top_p=0.9, seed=1000 + i, max_tokens=max_tokens)
        elif i % 4 == 3:
            params = SamplingParams(temperature=1.0, top_k=20, seed=2000 + i, max_tokens=max_tokens, n=2)
        elif i % 8 == 2:
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=3, prompt_logprobs=2)
        else:
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=[prompt[-1]])
        requests.append((prompt, params))
    return requests


def run_requests(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]]) -> dict[str, RequestOutput]:
    """Add ``requests`` as ``r0``, ``r1``, ... and step until all finish; the final output of each."""
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(f"r{i}", prompt, params)
    return run_to_completion(engine)


def token_ids(outputs: dict[str, RequestOutput]) -> dict[str, list[list[int]]]:
    return {rid: [list(c.token_ids) for c in out.outputs] for rid, out in outputs.items()}

"""Fixtures of the server tests: live ``mixtral serve`` apps on 127.0.0.1 over a tiny random-weight model.

``LiveServer`` is a real uvicorn server on a free port in a background thread (``mixtral.serve.inprocess``), over a
real engine built from the ``tiny_hf_checkpoint`` folder (v3 tokenizer). ``live_server`` is one such server shared
by the whole session (tests must leave it idle: every request finished); ``server_factory`` builds dedicated ones
(API key, queue limit, ...).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from mixtral.engine.llm_engine import EngineStats, LLMEngine
from mixtral.serve.inprocess import InProcessServer

MAX_MODEL_LEN = 256


def build_engine(model: str | Path, max_num_seqs: int = 16, max_model_len: int = MAX_MODEL_LEN) -> LLMEngine:
    """``model``: the ``tiny_hf_checkpoint`` folder (v3 tokenizer) or a preset such as ``tiny-v1``."""
    # 4 MiB of KV cache: 1024 blocks of 16 tokens for the tiny model (2 layers x 2 KV heads x 16 dims, fp32).
    return LLMEngine.from_config(str(model), device="cpu", dtype="float32", max_model_len=max_model_len,
                                 max_num_seqs=max_num_seqs, kv_cache_bytes=4 << 20)


class LiveServer(InProcessServer):
    """An in-process server with the helpers tests need."""

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)

    def wait_idle(self, timeout: float = 20.0) -> EngineStats:
        """Wait until the engine has no request left; return its stats (blocks must all be free then)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.llm.get_stats()
            if stats.num_requests == 0 and self.state.num_in_flight == 0:
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"engine still busy after {timeout}s: {stats}")
            time.sleep(0.02)


@pytest.fixture(scope="session")
def live_server(tiny_hf_checkpoint: Path) -> Iterator[LiveServer]:
    """A running server (no API key, no queue limit) named ``tiny-mixtral``, alias ``open-mixtral-8x22b``."""
    server = LiveServer(build_engine(tiny_hf_checkpoint), served_model_name="tiny-mixtral",
                        aliases=["open-mixtral-8x22b"])
    with server:
        yield server


@pytest.fixture(scope="session")
def server_factory(tiny_hf_checkpoint: Path) -> Callable[..., LiveServer]:
    """``server_factory(settings=..., max_num_seqs=...)`` -> an unstarted LiveServer (use it as a context manager)."""

    def make(max_num_seqs: int = 16, model: str | Path | None = None, max_model_len: int = MAX_MODEL_LEN,
             **kwargs: Any) -> LiveServer:
        kwargs.setdefault("served_model_name", "tiny-mixtral")
        engine = build_engine(model or tiny_hf_checkpoint, max_num_seqs=max_num_seqs, max_model_len=max_model_len)
        return LiveServer(engine, **kwargs)

    return make

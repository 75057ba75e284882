"""Engine test fixtures: one tiny random model per session, engines that are checked for leaked KV blocks.

``make_engine`` builds LLMEngines on the tiny model; after every test each engine it built must have no
unfinished request and every KV block free (abort and completion free all blocks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from engine_testing import assert_no_leaks, build_tiny_model

from mixtral.engine.config import EngineConfig
from mixtral.engine.llm_engine import LLMEngine
from mixtral.model.mixtral import Transformer
from mixtral.tokenizer import Tokenizer


@pytest.fixture(autouse=True)
def _one_torch_thread(single_torch_thread: None) -> None:
    """Every engine test runs on one torch thread (tests/conftest.py says why)."""


@pytest.fixture(scope="session")
def tiny_model() -> Transformer:
    return build_tiny_model()


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_version("v3")


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def make_engine(request: pytest.FixtureRequest, tiny_model: Transformer, tokenizer: Tokenizer
                ) -> Iterator[Callable[..., LLMEngine]]:
    """Every engine test runs twice: stepping synchronously, and with async scheduling (each decode step
    launched before the previous step's tokens are applied), which must not change any output."""
    engines: list[LLMEngine] = []

    def make(model: Transformer | None = None, **kwargs: Any) -> LLMEngine:
        kwargs.setdefault("num_kv_blocks", 512)
        kwargs.setdefault("max_model_len", 512)
        kwargs.setdefault("async_scheduling", request.param)
        engine = LLMEngine(model or tiny_model, EngineConfig(**kwargs), tokenizer)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        assert_no_leaks(engine)
        engine.shutdown()

"""A server over a TP 2 group answers the SDK tests (tests/serve/test_sdk_clients.py): current mistralai, openai
and mistralai 0.4.2, against the same tiny checkpoint and settings as the single-process server there."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from mixtral.distributed.engine import engine_over
from mixtral.distributed.executor import DistributedExecutor
from mixtral.engine.llm_engine import LLMEngine

SERVE_TESTS = Path(__file__).resolve().parents[1] / "serve"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sdk = _load("serve_test_sdk_clients", SERVE_TESTS / "test_sdk_clients.py")
serve_fixtures = _load("serve_conftest", SERVE_TESTS / "conftest.py")


@pytest.fixture
def tp_server(executor: DistributedExecutor) -> Iterator[Any]:
    engine = engine_over(executor, LLMEngine, model_name="tiny-mixtral", max_model_len=serve_fixtures.MAX_MODEL_LEN,
                         max_num_seqs=16, kv_cache_bytes=4 << 20)
    with serve_fixtures.LiveServer(engine, served_model_name="tiny-mixtral", aliases=["open-mixtral-8x22b"]) as server:
        yield server


@pytest.mark.parametrize("executor", ["tp2"], indirect=True)
def test_mistralai_current(tp_server: Any) -> None:
    sdk.test_mistralai_current(tp_server)


@pytest.mark.parametrize("executor", ["tp2"], indirect=True)
def test_openai(tp_server: Any) -> None:
    sdk.test_openai(tp_server)


@pytest.mark.parametrize("executor", ["tp2"], indirect=True)
def test_mistralai_042_documented_call(tp_server: Any) -> None:
    sdk.test_mistralai_042_documented_call(tp_server)

"""Stepping an engine until its requests finish: shared by the engine tests (``engine_testing``) and the
tensor-parallel tests (``tp_testing``), which live in folders that cannot import each other's helpers.

A plain module at the top of tests/ (the root conftest puts this folder on ``sys.path``); fixtures are in the
conftest files, not here.
"""

from __future__ import annotations

from collections.abc import Callable

from mixtral.engine.llm_engine import LLMEngine
from mixtral.engine.outputs import RequestOutput


def run_to_completion(engine: LLMEngine, check: Callable[[LLMEngine], None] | None = None
                      ) -> dict[str, RequestOutput]:
    """Step until every request finishes; return the final output of each. ``check`` runs after each step."""
    done: dict[str, RequestOutput] = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        if check is not None:
            check(engine)
        steps += 1
        assert steps < 10_000, "engine made no progress"
    return done

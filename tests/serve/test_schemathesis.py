"""Property-based fuzzing of the live server from its own /openapi.json (schemathesis): no request may get a 5xx.

Schemathesis generates valid and invalid bodies for every operation (chat and text completions, models, health,
metrics); a 500 would mean a request crashed a handler. The number of examples is bounded to keep the run short on
a 2-core CPU; generated bodies name the served model and their ``max_tokens`` are cut to 8 so valid requests stay
cheap (the grammar of the fields is what is being explored, not generation length).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error


def _steer(case: Any) -> None:
    """Point generated bodies at the served model (else nearly all stop at 404) and keep generation short."""
    if isinstance(case.body, dict):
        if isinstance(case.body.get("model"), str):
            case.body["model"] = "tiny-mixtral"
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(case.body.get(key), int) and case.body[key] > 8:
                case.body[key] = 8


def _fuzz(operation: Any, statuses: Counter[int]) -> None:
    @given(case=operation.as_strategy())
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def check(case: Any) -> None:
        _steer(case)
        response = case.call_and_validate(checks=[not_a_server_error], timeout=60)
        statuses[response.status_code] += 1

    check()


def test_no_server_errors(live_server: Any) -> None:
    schema = schemathesis.openapi.from_url(f"{live_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"} <= paths
    statuses: dict[str, Counter[int]] = {}
    for operation in operations:
        _fuzz(operation, statuses.setdefault(operation.path, Counter()))
    # Generation really ran on part of the generated bodies, and invalid ones were refused, not crashed on.
    assert statuses["/v1/chat/completions"][200] > 0 and statuses["/v1/completions"][200] > 0
    assert statuses["/v1/chat/completions"][422] > 0
    stats = live_server.wait_idle(timeout=60)
    assert stats.num_free_blocks == stats.num_total_blocks

"""Property-based fuzzing of the live server from its own /openapi.json (schemathesis), with all of its checks.

Every operation is fuzzed with schema-valid (positive) and schema-violating (negative) bodies, and every response
goes through schemathesis's full default check set: no 5xx, only documented status codes and content types,
responses (streamed events included) valid against their documented schemas, schema-violating requests refused,
schema-valid requests accepted. "Accepted" means anything but a 422: 400 is the answer to a request that is
well-formed but impossible (a prompt past the context, fields that contradict each other, a chat that
mistral-common cannot encode), which no schema can express; a 422 for schema-valid data would mean the document
and the validators disagree. A second, keyed server checks the bearer scheme: the document requires it, requests
without the key are refused (schemathesis's ``ignored_auth``).

Bounded for a 2-core CPU: a fixed number of examples per operation and mode, derandomized; generated bodies name
the served model (positive ones only: a negative case stays negative) and their ``max_tokens`` are cut to 8 so
valid requests stay cheap (the grammar of the fields is what is explored, not generation length).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig

from mixtral.serve.state import ServerSettings

EXAMPLES = 20
VOCAB = 32768  # the tiny checkpoint's v3 vocabulary
CONFIG = """
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "400", "404", "429"]
"""


def _steer(case: Any, positive: bool) -> None:
    """Point positive bodies at the served model (else nearly all stop at 404) and at ids inside the vocabulary;
    keep generation short. Each change keeps a positive case positive and leaves a negative one negative."""
    body = case.body
    if not isinstance(body, dict):
        return
    if positive and isinstance(body.get("model"), str):
        body["model"] = "tiny-mixtral"
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and body[key] > 8:
            body[key] = 8
    if positive:
        for key in ("prompt", "tokens"):
            value = body.get(key)
            if isinstance(value, list) and value and all(isinstance(t, int) for t in value):
                body[key] = [t % VOCAB for t in value]
            elif isinstance(value, list) and value and all(isinstance(x, list) for x in value):
                body[key] = [[t % VOCAB for t in x] for x in value]


def _fuzz_one(operation: Any, mode: GenerationMode, counts: Counter[int], headers: dict[str, str] | None,
              examples: int) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def check(case: Any) -> None:
        _steer(case, mode.is_positive)
        response = case.call_and_validate(headers=headers, timeout=60)  # every default check
        counts[response.status_code] += 1

    try:
        check()
    except Unsatisfiable:
        assert mode == GenerationMode.NEGATIVE  # a GET without parameters has no invalid form


def _fuzz(schema: Any, statuses: dict[tuple[str, str], Counter[int]], headers: dict[str, str] | None = None,
          paths: tuple[str, ...] | None = None, examples: int = EXAMPLES) -> None:
    for result in schema.get_all_operations():
        operation = result.ok()
        if paths is not None and operation.path not in paths:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz_one(operation, mode, statuses.setdefault((operation.label, mode.value), Counter()), headers,
                      examples)


def test_all_checks_pass(live_server: Any) -> None:
    schema = schemathesis.openapi.from_url(f"{live_server.url}/openapi.json",
                                           config=SchemathesisConfig.from_str(CONFIG))
    paths = {result.ok().path for result in schema.get_all_operations()}
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/tokenizer_info",
            "/health", "/metrics"} <= paths
    statuses: dict[tuple[str, str], Counter[int]] = {}
    _fuzz(schema, statuses)
    # Generation really ran on part of the generated bodies, and invalid ones were refused, not crashed on.
    for op in ("POST /v1/chat/completions", "POST /v1/completions", "POST /tokenize"):
        assert statuses[(op, "positive")][200] > 0, statuses
        assert statuses[(op, "negative")][422] > 0, statuses
    stats = live_server.wait_idle(timeout=60)
    assert stats.num_free_blocks == stats.num_total_blocks


@pytest.fixture(scope="module")
def keyed_server(server_factory: Any) -> Any:
    with server_factory(settings=ServerSettings(api_key="sekret")) as server:
        yield server


def test_bearer_scheme_documented_and_enforced(keyed_server: Any) -> None:
    with keyed_server.client() as http:
        doc = http.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": doc["components"]["securitySchemes"]["bearerAuth"][
            "description"]}
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["security"] == [{"bearerAuth": []}] and "401" in chat["responses"]
    assert "security" not in doc["paths"]["/health"]["get"] and "security" not in doc["paths"]["/metrics"]["get"]
    schema = schemathesis.openapi.from_url(f"{keyed_server.url}/openapi.json",
                                           config=SchemathesisConfig.from_str(CONFIG))
    # With the key every check passes (ignored_auth among them: it replays requests without the key).
    statuses: dict[tuple[str, str], Counter[int]] = {}
    _fuzz(schema, statuses, headers={"Authorization": "Bearer sekret"}, paths=("/v1/models", "/tokenize"), examples=5)
    assert statuses[("GET /v1/models", "positive")][200] > 0, statuses

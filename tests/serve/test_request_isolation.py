"""No request can stop the engine (issue 17, items 1-2), on a live server over the tiny model.

The two requests that used to disable the server for good: a tool schema with a recursive ``$ref`` under
``tool_choice: "any"``, and a ``response_format`` pattern ``^(a{1000}){1000}$``. Both are refused at admission
(400) by the compiler's trial walk; with the walk switched off they fail while running, and then only their own
stream ends, with an error event and ``[DONE]``. Other requests running meanwhile produce exactly what they
produce alone. Deep nesting is a 400 naming the depth; the grammar cache stays within its byte bound and never
keeps what was rejected or failed. A property test throws generated schemas and patterns at the server.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixtral.serve.grammar import GuideError
from mixtral.serve.guide_compiler import GuideLimits, configure, default_compiler
from mixtral.serve.guided import build_guide
from mixtral.serve.state import ServerSettings
from mixtral.tokenizer import Tokenizer

BASE = {"model": "tiny-mixtral", "messages": [{"role": "user", "content": "Give me the answer"}], "max_tokens": 24,
        "temperature": 0}
RECURSIVE = {"type": "object", "properties": {"node": {"$ref": "#/$defs/n"}}, "required": ["node"],
             "$defs": {"n": {"type": "object", "properties": {"child": {"$ref": "#/$defs/n"}}, "required": ["child"]}}}
KILLERS = {
    "recursive_ref": {"tools": [{"type": "function", "function": {"name": "f", "parameters": RECURSIVE}}],
                      "tool_choice": "any"},
    "huge_pattern": {"response_format": {"type": "json_schema", "json_schema": {
        "name": "p", "schema": {"type": "string", "pattern": "^(a{1000}){1000}$"}}}},
}
LONG = {**BASE, "max_tokens": 120, "ignore_eos": True}


@pytest.fixture(autouse=True)
def _default_guide_limits() -> Iterator[None]:
    """Servers built here may replace the process's guide compiler: give later tests the default one back."""
    yield
    configure(GuideLimits())


def sse_events(resp: httpx.Response) -> list[str]:
    return [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]


def stream_text(client: httpx.Client, body: dict[str, Any]) -> tuple[str, str | None]:
    """(content, finish_reason) of a streamed chat completion that must end normally."""
    text, finish = "", None
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        chunk = json.loads(event)
        assert "choices" in chunk, chunk
        for choice in chunk["choices"]:
            text += choice["delta"].get("content") or ""
            finish = choice["finish_reason"] or finish
    return text, finish


class Background:
    """A long greedy stream running in a thread while the test sends its bad requests."""

    def __init__(self, url: str) -> None:
        self.result: tuple[str, str | None] | None = None
        self.thread = threading.Thread(target=self._run, args=(url,))

    def _run(self, url: str) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            self.result = stream_text(client, LONG)

    def __enter__(self) -> Background:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(60)


def assert_healthy(server: Any, client: httpx.Client) -> None:
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text
    stats = server.wait_idle()
    assert stats.num_free_blocks == stats.num_total_blocks
    assert server.engine.is_running and server.engine.error is None


@pytest.mark.parametrize("name", list(KILLERS))
@pytest.mark.parametrize("stream", [False, True])
def test_known_killers_are_refused_at_admission(live_server: Any, name: str, stream: bool) -> None:
    with live_server.client() as client:
        alone = stream_text(client, LONG)
        with Background(live_server.url) as other:
            resp = client.post("/v1/chat/completions", json={**BASE, **KILLERS[name], "stream": stream})
        assert resp.status_code == 400, resp.text
        assert "constrained decoding cannot follow this grammar" in resp.json()["message"]
        assert other.result == alone  # the request running meanwhile is untouched
        assert_healthy(live_server, client)


@pytest.mark.parametrize("name", list(KILLERS))
def test_known_killers_found_only_while_running_fail_alone(server_factory: Any, name: str) -> None:
    """Without the trial walk the grammar fails mid-generation: an in-stream error and [DONE] (a 400 response when
    not streaming), the grammar leaves the cache, and the stream running beside it finishes as it would alone."""
    limits = GuideLimits(probe_tokens=0)
    with server_factory(settings=ServerSettings(guide_limits=limits)) as server, server.client() as client:
        compiler = default_compiler()
        assert compiler.limits == limits
        alone = stream_text(client, LONG)
        with Background(server.url) as other:
            with client.stream("POST", "/v1/chat/completions",
                               json={**BASE, **KILLERS[name], "stream": True}) as resp:
                assert resp.status_code == 200
                events = sse_events(resp)
            assert events[-1] == "[DONE]"
            error = json.loads(events[-2])
            assert error["object"] == "error" and error["code"] == "invalid_request", error
            assert "constrained decoding stopped" in error["message"]
            resp = client.post("/v1/chat/completions", json={**BASE, **KILLERS[name]})
            assert resp.status_code == 400 and "constrained decoding stopped" in resp.json()["message"]
        assert other.result == alone
        assert len(compiler.cache) == 0  # compiled, then evicted when it failed: never handed out again
        assert_healthy(server, client)
        assert stream_text(client, {**BASE, "max_tokens": 4}) == stream_text(client, {**BASE, "max_tokens": 4})


def nested_schema(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def nested_value(levels: int) -> Any:
    value: Any = "x"
    for _ in range(levels):
        value = {"a": value}
    return value


@pytest.mark.parametrize("where", ["json_schema", "tool_parameters", "body"])
def test_100_levels_of_nesting_is_a_400_naming_the_depth(live_server: Any, where: str) -> None:
    body: dict[str, Any] = {
        "json_schema": {**BASE, "response_format": {"type": "json_schema", "json_schema": {
            "name": "deep", "schema": nested_schema(100)}}},
        "tool_parameters": {**BASE, "tools": [{"type": "function", "function": {
            "name": "f", "parameters": nested_schema(100)}}]},
        "body": {**BASE, "metadata": nested_value(100)},
    }[where]
    with live_server.client() as client:
        resp = client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 400, resp.text
        assert resp.json()["code"] == "too_deeply_nested"
        depth = int(resp.json()["message"].split(" nests ")[1].split()[0])
        assert depth > 100 and f"nests {depth} levels deep; the limit is 64" in resp.json()["message"]
        # 10 000 levels (past any parser's recursion) is refused the same way.
        raw = '{"model": "tiny-mixtral", "messages": [], "metadata": ' + '[' * 10_000 + ']' * 10_000 + '}'
        resp = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert resp.status_code == 400 and "nests 10001 levels deep" in resp.json()["message"]
        assert_healthy(live_server, client)


def test_deep_schemas_are_refused_by_the_guide_builder_too() -> None:
    """Callers of ``build_guide`` outside the server (no body check in front) get a GuideError naming the depth."""
    with pytest.raises(GuideError, match=r"response_format\.json_schema\.schema nests 201 levels deep; the limit "
                                         r"is 64"):
        build_guide(Tokenizer.from_version("v3"), response_format={"type": "json_schema", "json_schema": {
            "schema": nested_schema(100)}})


def large_schema(i: int, properties: int = 150) -> dict[str, Any]:
    """A distinct schema of about 20 kB (its grammar costs the cache ~1.5 MB by the compiler's estimate)."""
    return {"type": "object", "properties": {f"field_{i}_{k}": {"type": "string", "description": "d" * 80}
                                             for k in range(properties)}}


def test_the_grammar_cache_stays_within_its_byte_bound(server_factory: Any) -> None:
    limits = GuideLimits(cache_bytes=4 << 20)
    with server_factory(settings=ServerSettings(guide_limits=limits)) as server, server.client() as client:
        cache = default_compiler().cache
        sizes = []
        for i in range(10):
            body = {**BASE, "max_tokens": 2, "response_format": {"type": "json_schema", "json_schema": {
                "name": "big", "schema": large_schema(i)}}}
            assert client.post("/v1/chat/completions", json=body).status_code == 200
            assert 0 < cache.nbytes <= limits.cache_bytes
            sizes.append(len(cache))
        assert max(sizes) >= 2 and sizes[-1] < 10  # entries were kept, and the oldest were let go
        kept = (len(cache), cache.nbytes)
        for name in KILLERS:  # refused at admission: never cached
            assert client.post("/v1/chat/completions", json={**BASE, **KILLERS[name]}).status_code == 400
        too_big = {**BASE, "response_format": {"type": "json_schema", "json_schema": {
            "name": "huge", "schema": large_schema(99, properties=6000)}}}
        resp = client.post("/v1/chat/completions", json=too_big)
        assert resp.status_code == 400 and "the limit is 524288 bytes" in resp.json()["message"]
        assert (len(cache), cache.nbytes) == kept
        assert_healthy(server, client)


# --------------------------------------------------------------------------- property test
_PATTERNS = st.one_of(
    st.sampled_from(["^(a{1000}){1000}$", "(a|aa)*b", "^[a-z]{3,5}$", "(x+x+)+y", "a{0,65535}", "[", "(?<=a)b",
                     "\\d{4}-\\d{2}", "^$", ".*", "(((((a)))))", "[^\\u0000-\\uffff]"]),
    st.text(alphabet="ab()[]{}*+?|^$.\\0123456789,-", max_size=16),
)
_LEAVES = st.one_of(
    st.builds(lambda t: {"type": t}, st.sampled_from(["string", "integer", "number", "boolean", "null", "object"])),
    st.builds(lambda p: {"type": "string", "pattern": p}, _PATTERNS),
    st.builds(lambda lo, hi: {"type": "string", "minLength": lo, "maxLength": hi},
              st.integers(0, 5000), st.integers(0, 5000)),
    st.builds(lambda lo, hi: {"type": "integer", "minimum": lo, "maximum": hi},
              st.integers(-10**30, 10**30), st.integers(-10**30, 10**30)),
    st.builds(lambda xs: {"enum": xs}, st.lists(st.one_of(st.integers(), st.text(max_size=4), st.none()),
                                                min_size=1, max_size=4)),
    st.sampled_from([{"$ref": "#"}, {"$ref": "#/$defs/nothing"}, {"type": "string", "format": "date-time"},
                     {"type": "string", "format": "email"}, {"const": {"a": [1, 2]}}, True, False, {}]),
)
_SCHEMAS = st.recursive(_LEAVES, lambda kids: st.one_of(
    st.builds(lambda props, req: {"type": "object", "properties": props, "required": req},
              st.dictionaries(st.text("abc", min_size=1, max_size=3), kids, max_size=3),
              st.lists(st.text("abc", min_size=1, max_size=3), max_size=3, unique=True)),
    st.builds(lambda item, lo, hi: {"type": "array", "items": item, "minItems": lo, "maxItems": hi},
              kids, st.integers(0, 3000), st.integers(0, 3000)),
    st.builds(lambda xs: {"anyOf": xs}, st.lists(kids, min_size=1, max_size=3)),
    st.builds(lambda xs: {"allOf": xs}, st.lists(kids, min_size=1, max_size=3)),
    st.builds(lambda x: {"not": x}, kids),
    st.builds(lambda x: {"type": "object", "properties": {"r": {"$ref": "#"}}, "required": ["r"], "$defs": {"k": x}},
              kids),
), max_leaves=6)


@st.composite
def _constrained_requests(draw: st.DrawFn) -> dict[str, Any]:
    schema = draw(_SCHEMAS)
    body: dict[str, Any] = {**BASE, "max_tokens": 8, "stream": draw(st.booleans())}
    if draw(st.booleans()):
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "g", "schema": schema,
                                                                          "strict": draw(st.booleans())}}
    else:
        params = {"type": "object", "properties": {"x": schema}, "required": draw(st.sampled_from([[], ["x"]]))}
        body["tools"] = [{"type": "function", "function": {"name": "g", "parameters": params}}]
        body["tool_choice"] = draw(st.sampled_from(["any", "auto", "none", "required"]))
    return body


def test_generated_schemas_and_patterns_never_hurt_the_server(live_server: Any) -> None:
    with live_server.client() as client:

        @settings(max_examples=40, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
        @given(body=_constrained_requests())
        def check(body: dict[str, Any]) -> None:
            if body["stream"]:
                with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                    status = resp.status_code
                    events = sse_events(resp) if status == 200 else []
                    text = "".join(events) if status == 200 else resp.read().decode()
                if status == 200:
                    assert events[-1] == "[DONE]"
                    for event in events[:-1]:
                        json.loads(event)
            else:
                resp = client.post("/v1/chat/completions", json=body)
                status, text = resp.status_code, resp.text
            assert status in (200, 400, 422), (status, text)
            assert "internal_server_error" not in text and "internal error" not in text, text
            assert live_server.engine.is_running, live_server.engine.error

        check()
        assert_healthy(live_server, client)
        assert stream_text(client, {**BASE, "max_tokens": 6})[1] in ("length", "stop")


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_request_checks_run_off_the_event_loop(live_server: Any, monkeypatch: Any, route: str) -> None:
    """jsonschema's look at a schema is pure Python (~2.5 s per MB, bounded by --max-guided-schema-bytes): run on
    the event loop it would stall every other request and stream for that long. The checks run in a worker
    thread, where no event loop runs (timing it instead measures GIL hand-offs in this one process)."""
    import asyncio

    from mixtral.serve.protocol import ChatCompletionRequest, CompletionRequest

    cls = ChatCompletionRequest if route.endswith("chat/completions") else CompletionRequest
    on_loop: list[bool] = []
    original = cls.check

    def check(self: Any) -> None:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # no event loop in this thread
            on_loop.append(False)
        original(self)

    monkeypatch.setattr(cls, "check", check)
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    if cls is ChatCompletionRequest:
        body: dict[str, Any] = {**BASE, "max_tokens": 1, "response_format": {
            "type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}
    else:
        body = {"model": "tiny-mixtral", "prompt": "Hi", "max_tokens": 1, "guided_json": schema}
    with live_server.client() as client:
        resp = client.post(route, json=body)
    assert resp.status_code == 200, resp.text
    assert on_loop == [False]

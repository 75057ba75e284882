"""The web page in a real headless Chromium against a live server over the tiny model (v3 tokenizer).

Each test drives the page as a person would (type, click) and checks what it shows against the API: a streamed
reply equal to the same request answered without streaming, a forced tool call shown and its typed result sent
back as a ``tool`` message, a reply forced (by a JSON-schema enum) to be a script injection shown as text with
no element created and no script run, the dashboard equal to ``/metrics``, and the key prompt of a server with
``--api-key``. Every page is checked for requests leaving the server, script errors and console errors.

Routing colours, twice: end to end (a real streamed reply from the engine, asked for with the page's routing boxes:
each token's colour is the palette colour of the first expert the API returned for it in the chosen layer, the hover
shows that token's routing in every layer), and with a hand-made stream in the routing contract of
``serve/routing.py`` (exact ids and weights chosen by the test: the heatmap counts and a layer switch). Screenshots
are written under the session's pytest temporary folder (printed with ``-s``).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from ui_browser import PageProbe, launch_browser

from mixtral.serve.state import ServerSettings

pytestmark = pytest.mark.timeout(120)

INJECTION = "<img src=x onerror=window.__xss=1><script>window.__xss=2</script>[a](javascript:window.__xss=3)"
WEATHER_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
    "required": ["city"], "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def ui_server(server_factory: Any) -> Iterator[Any]:
    with server_factory(max_num_seqs=4) as server:
        yield server


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = launch_browser(playwright, tmp_path_factory.mktemp("chromium-profile"))
        yield context
        context.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ui-screenshots")
    print(f"\nweb page screenshots: {folder}")
    return folder


def open_page(browser: Any, url: str) -> tuple[Any, PageProbe]:
    page = browser.new_page()
    page.set_default_timeout(20_000)
    probe = PageProbe(url)
    probe.attach(page)
    page.goto(url + "/")
    return page, probe


def check_clean(probe: PageProbe) -> None:
    assert probe.foreign_requests == [], f"the page fetched from outside the server: {probe.foreign_requests}"
    assert probe.page_errors == [], f"script errors: {probe.page_errors}"
    assert probe.console_errors == [], f"console errors: {probe.console_errors}"


@pytest.fixture
def page(browser: Any, ui_server: Any, shots: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    page, probe = open_page(browser, ui_server.url)
    page.wait_for_selector("#model option", state="attached")
    yield page
    page.screenshot(path=str(shots / f"{request.node.name}.png"))
    page.close()
    ui_server.wait_idle()
    check_clean(probe)


def wait_until(condition: Callable[[], bool], page: Any, timeout_s: float = 10.0) -> None:
    """Poll ``condition`` from here (the page's CSP forbids the string evaluation of ``wait_for_function``)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition still false after {timeout_s}s")
        page.wait_for_timeout(50)


def send(page: Any, text: str) -> Any:
    """Type a message, send it, wait for the reply to finish; the reply's element."""
    before = page.locator(".msg.assistant").count()
    page.fill("#input", text)
    page.click("#send")
    reply = page.locator(".msg.assistant").nth(before)
    reply.and_(page.locator("[data-done=true]")).wait_for(timeout=60_000)
    return reply


def greedy(page: Any, max_tokens: int) -> None:
    page.fill("#temperature", "0")
    page.fill("#max-tokens", str(max_tokens))


def test_page_loads_with_the_model_list_and_fetches_nothing_outside(browser: Any, ui_server: Any,
                                                                     shots: Path) -> None:
    page, probe = open_page(browser, ui_server.url)
    page.wait_for_selector("#model option", state="attached")
    names = page.eval_on_selector_all("#model option", "opts => opts.map(o => o.value)")
    models = httpx.get(ui_server.url + "/v1/models").json()["data"]
    assert names == [n for card in models for n in [card["id"], *card["aliases"]]]
    page.wait_for_selector("#expert-heatmap td")
    assert page.locator("#keybar").is_hidden()  # no key needed here
    page.screenshot(path=str(shots / "page_loads.png"))
    page.close()
    check_clean(probe)


def test_a_message_streams_in_and_equals_the_api_answer(page: Any, ui_server: Any) -> None:
    sent: list[dict[str, Any]] = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    page.fill("#system", "Answer briefly.")
    greedy(page, 24)
    page.fill("#stop", "")
    reply = send(page, "Tell me a saying.")
    body = sent[-1]
    assert body["stream"] is True and body["messages"][0] == {"role": "system", "content": "Answer briefly."}
    assert body["temperature"] == 0 and body["max_tokens"] == 24
    # Streamed: the text arrived in several deltas, each shown as it came.
    assert int(reply.get_attribute("data-deltas")) > 1
    expected = httpx.post(ui_server.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60).json()
    assert reply.locator(".content").inner_text() == expected["choices"][0]["message"]["content"].strip()
    assert page.evaluate("document.querySelector('.msg.assistant .content').textContent") == \
        expected["choices"][0]["message"]["content"]
    assert f"finish: {expected['choices'][0]['finish_reason']}" in reply.locator(".meta").inner_text()


def test_stop_ends_the_generation_and_frees_the_request(page: Any, ui_server: Any) -> None:
    aborted = _aborts(ui_server.url)
    greedy(page, 230)
    # Click Stop from inside the page the moment the first delta shows (from here, the ~1 s this model needs
    # for 230 tokens can pass before a click lands).
    page.evaluate("""() => new MutationObserver((changes, observer) => {
        if (document.querySelector('.msg.assistant[data-deltas]:not([data-deltas="0"])')) {
            observer.disconnect();
            document.getElementById('stop-button').click();
        }
    }).observe(document.getElementById('messages'), {subtree: true, attributes: true, childList: true})""")
    page.fill("#input", "Tell me a long story.")
    page.click("#send")
    reply = page.locator(".msg.assistant").first
    reply.and_(page.locator("[data-done=true]")).wait_for()
    assert reply.get_attribute("data-finish-reason") == "stopped"
    assert reply.locator(".content").inner_text()  # the partial answer stays
    ui_server.wait_idle()  # the server aborted the request: no sequence left, its blocks free
    assert _aborts(ui_server.url) == aborted + 1
    assert page.locator("#send").is_enabled() and page.locator("#stop-button").is_disabled()


def _aborts(url: str) -> float:
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        if family.name == "mixtral_requests":
            return sum(s.value for s in family.samples if s.labels.get("finish_reason") == "abort"
                       and s.name.endswith("_total"))
    return 0.0


def test_a_forced_tool_call_is_shown_and_its_result_goes_back(page: Any) -> None:
    sent: list[dict[str, Any]] = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    greedy(page, 48)
    page.fill("#tools", json.dumps(WEATHER_TOOLS))
    page.select_option("#tool-choice", "any")
    page.uncheck("#parallel-tools")
    reply = send(page, "Weather in Paris?")
    assert sent[-1]["tool_choice"] == "any" and sent[-1]["parallel_tool_calls"] is False
    assert reply.get_attribute("data-finish-reason") == "tool_calls"
    call = reply.locator(".toolcall")
    assert call.count() == 1
    assert call.locator(".name").inner_text() == "call get_weather"
    args = json.loads(call.locator("pre").inner_text())
    assert args["city"] in ("Paris", "Oslo")
    call_id = call.get_attribute("data-call-id")
    assert len(call_id) == 9
    # The page asks for the result; it goes back as a tool message answering that call, then the model replies.
    result = page.locator(f"#tool-result-fields textarea[data-call-id='{call_id}']")
    result.fill('{"temperature": 21, "sky": "clear"}')
    page.select_option("#tool-choice", "none")
    page.click("#send-results")
    second = page.locator(".msg.assistant").nth(1)
    second.and_(page.locator("[data-done=true]")).wait_for(timeout=60_000)
    messages = sent[-1]["messages"]
    assert messages[-2]["role"] == "assistant" and messages[-2]["tool_calls"][0]["id"] == call_id
    assert messages[-1] == {"role": "tool", "tool_call_id": call_id, "name": "get_weather",
                            "content": '{"temperature": 21, "sky": "clear"}'}
    assert sent[-1]["tool_choice"] == "none"
    assert second.get_attribute("data-finish-reason") in ("stop", "length")
    assert page.locator(".msg.tool .content").inner_text() == '{"temperature": 21, "sky": "clear"}'


@pytest.mark.parametrize("markdown", [False, True], ids=["text", "markdown"])
def test_a_script_injection_answer_is_shown_as_text(page: Any, markdown: bool) -> None:
    page.evaluate("window.__xss = 0")
    greedy(page, 120)
    page.select_option("#response-format", "json_schema")
    page.fill("#schema", json.dumps({"type": "string", "enum": [INJECTION]}))
    if markdown:
        page.check("#markdown")
        page.uncheck("#stream")  # and the non-streaming path
    reply = send(page, "Say something.")
    content = reply.locator(".content")
    assert content.inner_text() == json.dumps(INJECTION)  # the model's answer: the JSON string, verbatim
    # Nothing the model wrote became an element: text nodes only (markdown mode adds a <p> of its own, no more).
    tags = content.evaluate("el => [...el.querySelectorAll('*')].map(n => n.tagName)")
    assert tags == (["P"] if markdown else [])
    assert page.locator("#messages img, #messages script, #messages a").count() == 0
    page.wait_for_timeout(200)  # an onerror would have fired by now
    assert page.evaluate("window.__xss") == 0


def test_bad_tool_json_is_reported_and_nothing_is_sent(page: Any) -> None:
    sent: list[str] = []
    page.on("request", lambda r: sent.append(r.url) if r.url.endswith("/v1/chat/completions") else None)
    page.fill("#tools", '[{"type": "function", ')
    assert "not valid JSON" in page.inner_text("#tools-error")
    page.fill("#input", "Hi")
    page.click("#send")
    error = page.locator(".msg.error")
    error.wait_for()
    assert "tool definitions is not valid JSON" in error.inner_text()
    assert sent == []
    # Nothing joined the conversation: the message is still in the box, and fixing the tools sends it once.
    assert page.locator(".msg.user").count() == 0 and page.input_value("#input") == "Hi"
    page.fill("#tools", "")
    greedy(page, 4)
    page.click("#send")
    page.locator(".msg.assistant[data-done=true]").wait_for()
    assert len(sent) == 1 and page.locator(".msg.user").count() == 1 and page.input_value("#input") == ""


def test_markdown_mode_keeps_safe_links_only(page: Any) -> None:
    """The markdown renderer itself, given hostile input directly (the page's module, in the page)."""
    html = page.evaluate("""async () => {
        const { markdownBlocks } = await import('/ui/static/render.js');
        const box = document.createElement('div');
        box.append(...markdownBlocks('**b** [ok](https://example.org) [bad](javascript:alert(1)) ' +
                                     '![i](https://example.org/x.png) <b onclick=x>t</b>\\n' +
                                     '```\\n<script>1</script>\\n```'));
        return box.innerHTML;
    }""")
    assert '<a href="https://example.org" target="_blank" rel="noopener noreferrer nofollow">ok</a>' in html
    assert "javascript:" not in html.split("[bad](")[0] and "[bad](javascript:alert(1))" in html
    assert "<img" not in html and "&lt;b onclick=x&gt;t&lt;/b&gt;" in html
    assert "<pre><code>&lt;script&gt;1&lt;/script&gt;</code></pre>" in html


def _metrics(url: str) -> dict[str, Any]:
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
    counts = {(int(s.labels["layer"]), int(s.labels["expert"])): s.value
              for s in families["mixtral_expert_tokens"].samples if s.name == "mixtral_expert_tokens_total"}
    return {"counts": counts,
            "running": families["mixtral_num_requests_running"].samples[0].value,
            "waiting": families["mixtral_num_requests_waiting"].samples[0].value,
            "kv": families["mixtral_kv_cache_usage_ratio"].samples[0].value}


def test_the_dashboard_shows_the_numbers_of_metrics(page: Any, ui_server: Any) -> None:
    greedy(page, 8)
    send(page, "Count some tokens.")
    ui_server.wait_idle()
    scraped = _metrics(ui_server.url)
    assert sum(scraped["counts"].values()) > 0
    # The next refresh of the page's dashboard (it polls every 2 s) comes after the scrape.
    updates = int(page.get_attribute("#stats-updated", "data-updates") or 0)
    wait_until(lambda: int(page.get_attribute("#stats-updated", "data-updates") or 0) > updates, page)
    cells = page.eval_on_selector_all("#expert-heatmap td[data-count]", """tds => tds.map(td =>
        [Number(td.dataset.layer), Number(td.dataset.expert), Number(td.dataset.count)])""")
    assert {(layer, expert): count for layer, expert, count in cells} == scraped["counts"]
    assert float(page.inner_text("#stat-running")) == scraped["running"]
    assert float(page.inner_text("#stat-waiting")) == scraped["waiting"]
    assert page.inner_text("#stat-kv") == f"{scraped['kv'] * 100:.1f}%"
    # Tokens per second over the last minutes: the sparkline has a point per sampled interval.
    assert page.locator("#spark-tps polyline").count() == 1


def _fake_routing(tokens: list[str], num_layers: int, num_experts: int, top_k: int) -> list[dict[str, Any]]:
    """Routing entries in the API's shape, with expert ids that differ per token and layer."""
    entries = []
    for i, token in enumerate(tokens):
        experts = [[(3 * i + 5 * layer + j) % num_experts for j in range(top_k)] for layer in range(num_layers)]
        weights = [[0.7, 0.3][:top_k] for _ in range(num_layers)]
        entries.append({"token_id": 100 + i, "token": token, "experts": experts, "weights": weights})
    return entries


def test_tokens_are_coloured_by_the_expert_ids_the_api_returned(page: Any, ui_server: Any) -> None:
    stats = httpx.get(ui_server.url + "/v1/stats").json()
    num_layers, num_experts, top_k = stats["num_layers"], stats["num_experts"], stats["top_k"]
    tokens = [" The", " sky", " is", " <b>blue</b>", "</s>"]
    entries = _fake_routing(tokens, num_layers, num_experts, top_k)
    prompt_entries = _fake_routing(["<s>", "[INST]", " Hi"], num_layers, num_experts, top_k)
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
    for k, entry in enumerate(entries):
        routing: dict[str, Any] = {"tokens": [entry]}
        if k == 0:
            routing["prompt_tokens"] = prompt_entries
        chunks.append({"choices": [{"index": 0, "delta": {"content": entry["token"]}, "finish_reason": None,
                                    "routing": routing}]})
    chunks.append({"choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "stop"}]})
    head = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    stream = "".join(f"data: {json.dumps({**head, **c})}\n\n" for c in chunks) + "data: [DONE]\n\n"
    bodies: list[dict[str, Any]] = []

    def fulfil(route: Any) -> None:
        bodies.append(route.request.post_data_json)
        route.fulfill(status=200, headers={"content-type": "text/event-stream"}, body=stream)

    page.route("**/v1/chat/completions", fulfil)
    wait_until(lambda: page.locator("#layer option").count() == num_layers, page)
    page.check("#routing")
    page.check("#prompt-routing")
    layer = num_layers - 1
    page.select_option("#layer", str(layer))
    reply = send(page, "Hi")
    assert bodies[-1]["return_routing"] is True and bodies[-1]["return_prompt_routing"] is True

    palette = page.evaluate("import('/ui/static/routing.js').then(m => m.PALETTE)")

    def colours(selector: str) -> list[tuple[str, int, str]]:
        return reply.locator(selector).evaluate_all(
            "spans => spans.map(s => [s.textContent, Number(s.dataset.expert), getComputedStyle(s).backgroundColor])")

    def rgb(hex_colour: str) -> str:
        r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
        return f"rgb({r}, {g}, {b})"

    shown = colours(".tokens:not(.prompt-tokens) .tok")
    assert [s[0] for s in shown] == tokens  # token text as text, "<b>" included
    assert [s[1] for s in shown] == [e["experts"][layer][0] for e in entries]
    assert [s[2] for s in shown] == [rgb(palette[e["experts"][layer][0]]) for e in entries]
    prompt = colours(".prompt-tokens .tok")
    assert [s[1] for s in prompt] == [e["experts"][layer][0] for e in prompt_entries]
    assert reply.locator(".tokens b").count() == 0
    # Another layer re-colours the same tokens.
    page.select_option("#layer", "0")
    assert [s[1] for s in colours(".tokens:not(.prompt-tokens) .tok")] == [e["experts"][0][0] for e in entries]
    # The message's heatmap counts every top-k choice of every generated token.
    expected = [[0] * num_experts for _ in range(num_layers)]
    for entry in entries:
        for lay, row in enumerate(entry["experts"]):
            for expert in row:
                expected[lay][expert] += 1
    cells = reply.locator(".heatmap td[data-count]").evaluate_all(
        "tds => tds.map(td => [Number(td.dataset.layer), Number(td.dataset.expert), Number(td.dataset.count)])")
    assert {(la, ex): c for la, ex, c in cells} == {(la, ex): expected[la][ex]
                                                    for la in range(num_layers) for ex in range(num_experts)}
    # Hovering a token shows its routing in every layer.
    reply.locator(".tokens:not(.prompt-tokens) .tok").nth(1).hover()
    tip = page.locator("#tooltip")
    tip.wait_for(state="visible")
    rows = tip.locator("tr").all_inner_texts()
    assert len(rows) == num_layers
    for lay, text in enumerate(rows):
        assert f"e{entries[1]['experts'][lay][0]} 70.0%" in text


def _rgb(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgb({r}, {g}, {b})"


def _shown_tokens(reply: Any, selector: str) -> list[tuple[str, int, str]]:
    """(text, data-expert, background colour) of each token span under ``selector`` in ``reply``."""
    return reply.locator(selector).evaluate_all(
        "spans => spans.map(s => [s.textContent, Number(s.dataset.expert), getComputedStyle(s).backgroundColor])")


def test_a_real_streamed_reply_is_coloured_by_the_routing_the_api_returned(page: Any, ui_server: Any) -> None:
    num_layers = httpx.get(ui_server.url + "/v1/stats").json()["num_layers"]
    wait_until(lambda: page.locator("#layer option").count() == num_layers, page)
    greedy(page, 16)
    page.fill("#stop", "")
    page.check("#routing")
    page.check("#prompt-routing")
    layer = num_layers - 1
    page.select_option("#layer", str(layer))
    with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as answer:
        reply = send(page, "Name a colour.")
    response = answer.value
    assert response.request.post_data_json["stream"] is True
    assert response.request.post_data_json["return_prompt_routing"] is True
    # What the API sent the page: routing in several chunks (a real stream), the prompt's once.
    chunks = [json.loads(line[6:]) for line in response.text().splitlines() if line.startswith("data: {")]
    routed = [c["choices"][0]["routing"] for c in chunks if c["choices"] and "routing" in c["choices"][0]]
    assert len(routed) > 1
    tokens = [entry for r in routed for entry in r["tokens"]]
    prompt = [entry for r in routed for entry in r.get("prompt_tokens") or []]
    usage = next(c["usage"] for c in chunks if c.get("usage"))
    assert len(tokens) == usage["completion_tokens"] and len(prompt) == usage["prompt_tokens"]

    palette = page.evaluate("import('/ui/static/routing.js').then(m => m.PALETTE)")
    shown = _shown_tokens(reply, ".tokens:not(.prompt-tokens) .tok")
    assert [s[0] for s in shown] == [e["token"] for e in tokens]
    assert [s[1] for s in shown] == [e["experts"][layer][0] for e in tokens]
    assert [s[2] for s in shown] == [_rgb(palette[e["experts"][layer][0]]) for e in tokens]
    shown_prompt = _shown_tokens(reply, ".prompt-tokens .tok")
    assert [s[1] for s in shown_prompt] == [e["experts"][layer][0] for e in prompt]
    assert [s[2] for s in shown_prompt] == [_rgb(palette[e["experts"][layer][0]]) for e in prompt]
    # The hover shows that token's routing: every layer's experts with their weights, as the API gave them.
    pick = len(tokens) // 2
    reply.locator(".tokens:not(.prompt-tokens) .tok").nth(pick).hover()
    tip = page.locator("#tooltip")
    tip.wait_for(state="visible")
    assert f"(id {tokens[pick]['token_id']})" in tip.inner_text()
    rows = tip.locator("tr").all_inner_texts()
    assert len(rows) == num_layers
    for lay, text in enumerate(rows):
        picks = re.findall(r"e(\d+) ([\d.]+)%", text)  # the page rounds to 0.1% (JavaScript's toFixed)
        assert [int(e) for e, _ in picks] == tokens[pick]["experts"][lay]
        assert [float(w) for _, w in picks] == pytest.approx([w * 100 for w in tokens[pick]["weights"][lay]],
                                                             abs=0.051)


def test_with_an_api_key_the_page_asks_for_it(browser: Any, server_factory: Any, shots: Path) -> None:
    with server_factory(settings=ServerSettings(api_key="sesame")) as server:
        assert httpx.get(server.url + "/").status_code == 200  # the page and its files are public
        assert httpx.get(server.url + "/ui/static/app.js").status_code == 200
        assert httpx.get(server.url + "/v1/stats").status_code == 401  # the API is not
        page = browser.new_page()
        page.goto(server.url + "/")
        page.locator("#keybar").wait_for(state="visible")
        assert page.locator("#model option").count() == 0
        page.screenshot(path=str(shots / "api_key_prompt.png"))
        page.fill("#key-input", "sesame")
        page.click("#key-save")
        page.wait_for_selector("#model option", state="attached")
        page.wait_for_selector("#expert-heatmap td")
        assert page.locator("#keybar").is_hidden()
        assert page.evaluate("sessionStorage.getItem('mixtral.apiKey')") == "sesame"
        page.close()

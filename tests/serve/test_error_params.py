"""An error names the offending field in ``param`` (which the openai SDK exposes as ``.param``) and its message
carries the validator's own words, without pydantic's "Value error, " prefix: 422 when the body breaks the schema,
400 when fields valid alone contradict each other."""

from __future__ import annotations

from typing import Any

import openai
import pytest

USER = [{"role": "user", "content": "Hi"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(("changes", "status", "param", "fragment"), [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, "tool_choice",
     "tool_choice names function 'nope', which is not in tools ['get_weather']"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, "tool_choice", "not in tools []"),
    ({"tool_choice": "any"}, 400, "tool_choice", "tool_choice='any' needs a non-empty 'tools' list"),
    # tools itself is invalid: that is the error reported, not a consequence of it.
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}],
      "tool_choice": {"type": "function", "function": {"name": "bad name"}}}, 422, "tools[0].function.name",
     "pattern"),
])
def test_error_names_the_field(live_server: Any, changes: dict[str, Any], status: int, param: str,
                               fragment: str) -> None:
    with live_server.client() as client:
        resp = client.post("/v1/chat/completions", json={"model": "tiny-mixtral", "messages": USER, **changes})
    assert resp.status_code == status, resp.text
    err = resp.json()
    assert err["param"] == param and err["error"]["param"] == param, err
    assert fragment in err["message"] and "Value error" not in err["message"], err["message"]


def test_openai_sdk_sees_the_param(live_server: Any) -> None:
    client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-mixtral", messages=USER, tools=[WEATHER],  # type: ignore[list-item]
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert info.value.param == "tool_choice" and "'nope'" in info.value.message


def test_missing_v1_prefix_gets_a_hint(live_server: Any) -> None:
    # The openai SDK with base_url="http://host:port" (no /v1) posts to /chat/completions.
    client = openai.OpenAI(base_url=live_server.url, api_key="k", max_retries=0)
    with pytest.raises(openai.NotFoundError, match=r"did you mean /v1/chat/completions\?"):
        client.chat.completions.create(model="tiny-mixtral", messages=USER)  # type: ignore[arg-type]
    with live_server.client() as http:
        resp = http.get("/models")
        assert resp.status_code == 404 and "did you mean /v1/models?" in resp.json()["message"]
        resp = http.get("/v1/nothing")
        assert resp.status_code == 404 and "did you mean" not in resp.json()["message"]


@pytest.mark.parametrize("prompt", [5, [], [[]], ["Hi", 3], [[1, 2], "Hi"]])
def test_malformed_completion_prompt_is_a_422_naming_prompt(live_server: Any, prompt: Any) -> None:
    with live_server.client() as http:
        resp = http.post("/v1/completions", json={"model": "tiny-mixtral", "prompt": prompt, "max_tokens": 2})
    assert resp.status_code == 422, resp.text
    err = resp.json()
    assert err["param"].startswith("prompt"), err

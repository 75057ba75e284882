"""Requests the engine could never serve are refused with a 4xx before any SSE starts: a streaming client must
get the same status and message as a non-streaming one (the mistralai SDK cannot parse an error event inside a
200 stream, and the openai SDK raises a bare APIError without the status)."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from mistralai.client import Mistral
from mistralai.client import errors as mistral_errors

CHAT = {"model": "tiny-mixtral", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMPLETION = {"model": "tiny-mixtral", "prompt": "Hi", "max_tokens": 2}


@pytest.fixture(scope="module")
def two_seq_server(server_factory: Any) -> Any:
    with server_factory(max_num_seqs=2) as server:
        yield server


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("path", "body"), [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)])
def test_n_above_max_num_seqs_is_400(two_seq_server: Any, path: str, body: dict[str, Any], stream: bool) -> None:
    with two_seq_server.client() as client:
        resp = client.post(path, json={**body, "n": 3, "stream": stream})
        assert resp.status_code == 400, resp.text
        err = resp.json()
        assert err["param"] == "n" and "n=3" in err["message"] and "--max-num-seqs" in err["message"], err
        ok = client.post(path, json={**body, "n": 2, "stream": stream})
        assert ok.status_code == 200 and "error" not in ok.text, ok.text
    stats = two_seq_server.wait_idle()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_sdks_raise_their_bad_request_errors_when_streaming(two_seq_server: Any) -> None:
    oai = openai.OpenAI(base_url=f"{two_seq_server.url}/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="max-num-seqs"):
        list(oai.chat.completions.create(model="tiny-mixtral", messages=CHAT["messages"], n=3, stream=True))
    mistral = Mistral(api_key="k", server_url=two_seq_server.url)
    with pytest.raises(mistral_errors.SDKError, match="max-num-seqs") as info:
        list(mistral.chat.stream(model="tiny-mixtral", messages=CHAT["messages"], n=3))
    assert info.value.status_code == 400

"""Model ids with a slash (a Hugging Face repo id served under its own name) work everywhere, including
``GET /v1/models/{id}`` that both SDKs call to retrieve one card."""

from __future__ import annotations

from typing import Any

import openai
from mistralai.client import Mistral

NAME = "mistralai/Mixtral-8x7B-Instruct-v0.1"


def test_slashed_model_id(server_factory: Any) -> None:
    with server_factory(served_model_name=NAME) as server:
        oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0)
        assert oai.models.retrieve(NAME).id == NAME
        card = Mistral(api_key="k", server_url=server.url).models.retrieve(model_id=NAME)
        assert card.id == NAME and card.max_context_length == server.state.model.max_model_len
        with server.client() as client:
            resp = client.get("/v1/models/mistralai/other")
            assert resp.status_code == 404 and "'mistralai/other' not found" in resp.json()["message"]
        reply = oai.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert reply.model == NAME

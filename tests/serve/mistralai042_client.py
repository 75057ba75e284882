"""Run by the ``mistralai==0.4.2`` venv (not by pytest): the documented ``MistralClient`` calls against a live
server, printing one JSON object with what the client parsed. Usage: ``python mistralai042_client.py URL``."""

import json
import sys

from mistralai.client import MistralClient
from mistralai.models.chat_completion import ChatMessage

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["unit"], "additionalProperties": False}}}]


def main(url: str) -> None:
    client = MistralClient(api_key="any", endpoint=url, max_retries=0)
    out = {}
    models = client.list_models()
    out["models"] = [m.id for m in models.data]
    messages = [ChatMessage(role="user", content="What's the weather like in Paris?")]
    # The call from Mixtral-8x22B's documentation, verbatim but for max_tokens and the seed (a random-weight model
    # may chain several parallel calls: give it room, and make the run reproducible).
    resp = client.chat(model="open-mixtral-8x22b", messages=messages, tools=TOOLS, tool_choice="any", max_tokens=160,
                       random_seed=0)
    msg = resp.choices[0].message
    out["tool_calls"] = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                         for c in msg.tool_calls or []]
    out["tool_finish"] = str(resp.choices[0].finish_reason.value if resp.choices[0].finish_reason else None)
    out["tool_content"] = msg.content
    # Second turn: the assistant's call and the tool's result go back.
    messages.append(msg)
    call = msg.tool_calls[0]
    messages.append(ChatMessage(role="tool", name=call.function.name, content='{"temp": 21}', tool_call_id=call.id))
    resp = client.chat(model="open-mixtral-8x22b", messages=messages, max_tokens=5, temperature=0.0)
    out["round_trip_content"] = resp.choices[0].message.content
    out["usage"] = resp.usage.total_tokens
    chunks = list(client.chat_stream(model="tiny-mixtral", messages=[ChatMessage(role="user", content="Hi")],
                                     max_tokens=5, temperature=0.0, random_seed=3))
    out["stream_text"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    out["stream_finish"] = [str(c.choices[0].finish_reason.value) for c in chunks
                            if c.choices and c.choices[0].finish_reason]
    resp = client.chat(model="tiny-mixtral", messages=[ChatMessage(role="user", content="Hi")], max_tokens=5,
                       temperature=0.0, random_seed=3)
    out["text"] = resp.choices[0].message.content
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])

"""Server-sent events: the ``data: {json}\\n\\n ... data: [DONE]`` stream both APIs use, closed deterministically.

``EventStreamResponse`` is Starlette's ``StreamingResponse`` with two guarantees the server relies on: the event
generator is always closed (``aclose``) when the response ends, whether the stream finished, failed or the client
hung up (so the request's ``finally`` aborts it in the engine and its KV blocks are freed at once, not whenever the
garbage collector gets to it); and ``on_close`` runs exactly once afterwards (it releases the request's admission
slot). Disconnects are detected by listening on ``receive`` for ``http.disconnect`` while streaming.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"


def sse_event(payload: dict[str, Any]) -> bytes:
    """One ``data:`` event holding ``payload`` as compact JSON."""
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n\n"


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None] | None = None) -> None:
        # No proxy buffering (nginx), no caching: each event must reach the client as it is produced.
        super().__init__(events, media_type=self.media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream_then_stop() -> None:
                    await self.stream_response(send)
                    tg.cancel_scope.cancel()

                async def watch_disconnect() -> None:
                    await self.listen_for_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream_then_stop)
                tg.start_soon(watch_disconnect)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self._events, "aclose", None)
                if aclose is not None:
                    await aclose()
                if self._on_close is not None:
                    self._on_close()

"""Server-sent events: the ``data: {json}\\n\\n ... data: [DONE]`` stream both APIs use, closed deterministically.

``EventStreamResponse`` is Starlette's ``StreamingResponse`` with two guarantees the server relies on: the event
generator is always closed (``aclose``) when the response ends, whether the stream finished, failed or the client
hung up (so the request's ``finally`` aborts it in the engine and its KV blocks are freed at once, not whenever the
garbage collector gets to it); and ``on_close`` runs exactly once afterwards (it releases the request's admission
slot). Disconnects are detected by listening on ``receive`` for ``http.disconnect`` while streaming.

A client that stays connected but stops reading fills the socket's buffers, and then every ``send`` waits: after
``stall_timeout`` seconds of one send waiting, the stream is given up exactly as for a disconnect (the request is
aborted and its KV blocks freed) and the connection is dropped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from typing import Any

import anyio
import anyio.lowlevel
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

logger = logging.getLogger("mixtral.serve")

# Set in the task of a stream given up on a stalled client (see ``_StalledStreamFilter``).
_gave_up: ContextVar[bool] = ContextVar("mixtral_stream_gave_up", default=False)


class _StalledStreamFilter(logging.Filter):
    """uvicorn logs a response the app left unfinished as an error; for a stream given up on a client that stopped
    reading that is the intended outcome, already reported as a warning, so uvicorn's line is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_gave_up.get() and record.getMessage().startswith("ASGI callable returned without completing"))


def _quiet_uvicorn_about_stalls() -> None:
    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _StalledStreamFilter) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(_StalledStreamFilter())

DONE = b"data: [DONE]\n\n"


def sse_event(payload: dict[str, Any]) -> bytes:
    """One ``data:`` event holding ``payload`` as compact JSON."""
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n\n"


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None] | None = None,
                 stall_timeout: float | None = None) -> None:
        # No proxy buffering (nginx), no caching: each event must reach the client as it is produced.
        super().__init__(events, media_type=self.media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events
        self._on_close = on_close
        self._stall_timeout = stall_timeout
        self.stalled = False  # given up on a client that stopped reading

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def timed_send(message: Message) -> None:
                    with anyio.move_on_after(self._stall_timeout) as waited:
                        await send(message)
                    if waited.cancelled_caught:
                        self.stalled = True
                        tg.cancel_scope.cancel()
                        await anyio.lowlevel.checkpoint()  # the cancellation lands here

                async def stream_then_stop() -> None:
                    await self.stream_response(timed_send if self._stall_timeout else send)
                    tg.cancel_scope.cancel()

                async def watch_disconnect() -> None:
                    await self.listen_for_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream_then_stop)
                tg.start_soon(watch_disconnect)
            if self.stalled:
                _gave_up.set(True)  # seen by the filter when uvicorn logs, later in this same task
                _quiet_uvicorn_about_stalls()
                client = scope.get("client") or ("?", 0)
                logger.warning("client %s:%s stopped reading for %gs (--stall-timeout): stream aborted, its KV "
                               "blocks freed", client[0], client[1], self._stall_timeout)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self._events, "aclose", None)
                if aclose is not None:
                    await aclose()
                if self._on_close is not None:
                    self._on_close()

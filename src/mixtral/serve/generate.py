"""Driving one admitted request through the AsyncEngine: metrics, engine errors, abort on disconnect.

``stream_outputs`` wraps ``AsyncEngine.generate``: it records time to first token, inter-token latency and the
finished request's figures, turns the engine's "can never fit" ``ValueError`` into a 400, and makes sure an
unfinished request is aborted (its KV blocks freed) however the consumer stops: cancellation, ``aclose`` or an
error. A request the engine failed alone (``RequestOutput.error``) becomes an ``APIError`` (400 when its own input
is at fault, else 500), as does one cut by the end of a drain (503): streaming handlers send it as an error event
before ``[DONE]``, non-streaming ones as the response. ``collect_until_disconnect`` runs a non-streaming request
while watching the connection, so a client that hangs up stops its generation too (Starlette only notices
disconnects of streaming responses by itself).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import anyio
from starlette.requests import Request
from starlette.responses import Response

from mixtral.engine.async_engine import EngineDeadError, EngineOverloadedError
from mixtral.engine.outputs import RequestOutput
from mixtral.sampling import SamplingParams
from mixtral.serve.errors import APIError
from mixtral.serve.sse import EventStreamResponse
from mixtral.serve.state import RequestTracker, ServerState
from mixtral.serve.tools import starts_with_tool_call


def finish_reason_of(engine_reason: str | None) -> str | None:
    """Engine finish reasons -> API ones ("abort" happens only when the server stops: report it as an error)."""
    if engine_reason == "abort":
        return "error"
    return engine_reason


def _ended_error(state: ServerState, out: RequestOutput) -> APIError | None:
    """The error a finished output stands for: the engine failed the request, or a drain cut it."""
    if out.error is not None:
        if out.error.invalid_request:
            return APIError(400, out.error.message, code="invalid_request")
        return APIError(500, out.error.message, code="internal_error")
    if out.outputs and out.outputs[0].finish_reason == "abort":
        return APIError(503, f"the server is shutting down and this request did not finish within the drain timeout "
                             f"({state.settings.drain_timeout:g}s, --drain-timeout); retry it", code="shutting_down",
                        headers={"Retry-After": str(state.settings.retry_after_s)})
    return None


async def stream_outputs(state: ServerState, tracker: RequestTracker, prompt_ids: list[int], params: SamplingParams,
                         request_id: str) -> AsyncIterator[RequestOutput]:
    """Yield the engine's cumulative ``RequestOutput``s for one request, recording metrics."""
    metrics = state.metrics
    prev_tokens = 0
    last_time = tracker.arrival
    finished = False
    started = False
    refused = False  # the engine never took the request: nothing to abort or count
    iterator = state.engine.generate(prompt_ids, params, request_id).__aiter__()
    try:
        while True:
            try:
                out = await iterator.__anext__()
            except StopAsyncIteration:
                break
            except EngineOverloadedError as exc:
                refused = True
                raise APIError(429, str(exc), code="queue_full", headers={"Retry-After": "1"}) from exc
            except EngineDeadError as exc:
                refused = not started
                cause = f" (cause: {exc.__cause__!r})" if exc.__cause__ is not None else ""
                raise APIError(503, f"the engine is not serving: {exc}{cause}", code="engine_unavailable",
                               headers={"Retry-After": "1"}) from exc
            except ValueError as exc:
                if started:
                    raise
                refused = True
                # Refused at admission: the request can never fit this engine (prompt + max_tokens too long).
                raise APIError(400, str(exc), code="context_length_exceeded") from exc
            started = True
            now = time.monotonic()
            n_tokens = len(out.outputs[0].token_ids) if out.outputs else 0  # ITL follows sample 0
            new = n_tokens - prev_tokens
            if new > 0:
                if prev_tokens == 0:
                    metrics.first_token(now - tracker.arrival)
                    tracker.started()
                    # Tokens that came with the first one (a multi-token step) count as zero-latency gaps.
                    metrics.inter_token(0.0, new - 1)
                else:
                    metrics.inter_token(now - last_time, new)
                prev_tokens, last_time = n_tokens, now
            if out.finished:
                finished = True
                ended = _ended_error(state, out)
                if ended is not None:
                    metrics.finished("error" if out.error is not None else "abort", prompt_tokens=len(prompt_ids),
                                     cached_tokens=out.num_cached_tokens or 0,
                                     generated=sum(len(o.token_ids) for o in out.outputs), e2e_s=now - tracker.arrival)
                    raise ended
                reason = finish_reason_of(out.outputs[0].finish_reason if out.outputs else None) or "stop"
                if reason == "stop" and out.outputs and starts_with_tool_call(out.outputs[0].token_ids,
                                                                             state.tokenizer.tool_calls_id):
                    reason = "tool_calls"  # what the API reports for it, so the metric agrees with clients
                metrics.finished(reason, prompt_tokens=len(prompt_ids), cached_tokens=out.num_cached_tokens or 0,
                                 generated=sum(len(o.token_ids) for o in out.outputs), e2e_s=now - tracker.arrival)
            yield out
            if finished:
                break
    finally:
        if not finished:
            # Cancelled or closed early: free the request's blocks. Shielded, because under an anyio cancel
            # scope every await of a cancelled task would be cancelled again before it could run.
            with anyio.CancelScope(shield=True):
                await state.engine.abort(request_id)
                await iterator.aclose()
            if not refused:
                metrics.requests.labels(state.model.name, "abort").inc()


async def _wait_for_disconnect(request: Request) -> None:
    """Return once the client has gone (the body was already read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect_until_disconnect(request: Request, outputs: AsyncIterator[RequestOutput]) -> RequestOutput | None:
    """The last output of ``outputs`` (the finished request), or None if the client disconnected first.

    The generation runs in a task raced against a disconnect watcher; whichever loses is cancelled, and
    cancelling the generation aborts the engine request (see ``stream_outputs``).
    """

    async def drain() -> RequestOutput | None:
        last = None
        async for out in outputs:
            last = out
        return last

    gen_task = asyncio.ensure_future(drain())
    watch_task = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({gen_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (gen_task, watch_task):
            if not task.done():
                task.cancel()
        # Let the cancelled generation run its finally (the abort) before the handler returns.
        await asyncio.gather(gen_task, watch_task, return_exceptions=True)
    if gen_task in done and not gen_task.cancelled():
        return gen_task.result()  # re-raises APIError and bugs
    return None


async def run_request(state: ServerState, request: Request, prompt_ids: list[int], params: SamplingParams,
                      request_id: str, stream: bool,
                      events: Callable[[AsyncIterator[RequestOutput], int], AsyncIterator[bytes]]
                      ) -> Response | RequestOutput:
    """Admit a request and run it: the SSE response (``events`` renders the outputs) when streaming, else the
    final RequestOutput, or a 499 response when the client hung up first. The admission slot is released
    however it ends (for a stream, when the response closes)."""
    tracker = state.admit()
    try:
        outputs = stream_outputs(state, tracker, prompt_ids, params, request_id)
        if stream:
            return EventStreamResponse(events(outputs, len(prompt_ids)), on_close=tracker.release,
                                       stall_timeout=state.settings.stall_timeout)
        final = await collect_until_disconnect(request, outputs)
    except BaseException:
        tracker.release()
        raise
    tracker.release()
    return Response(status_code=499) if final is None else final  # 499: nobody is left to read it

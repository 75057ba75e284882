"""AsyncEngine: drives an LLMEngine from a background thread and streams each request's outputs to asyncio.

The server's event loop never waits on the model: ``generate`` hands the request to the engine thread and
awaits its per-request stream (the newest cumulative output), which the engine thread feeds through
``loop.call_soon_threadsafe``. All
engine calls (add, step, abort) happen on that one thread, so the single-threaded LLMEngine needs no locks.
Cancelling a ``generate`` consumer (a client that disconnects) aborts its request and frees its blocks.

    engine = AsyncEngine(LLMEngine.from_config("demo"))
    await engine.start()
    async for out in engine.generate("Hello", SamplingParams(max_tokens=16), "req-1"):
        print(out.outputs[0].text)
    await engine.shutdown(drain_timeout=10)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable

import torch

from mixtral.engine.llm_engine import EngineStats, LLMEngine
from mixtral.engine.outputs import RequestOutput
from mixtral.sampling import SamplingParams
from mixtral.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class EngineOverloadedError(RuntimeError):
    """More requests are queued than ``max_queued_requests`` allows (the server answers 503)."""


class EngineDeadError(RuntimeError):
    """The engine thread stopped (shut down, or crashed on an error it reports as the cause)."""


class _Stream:
    """One request's outputs, handed from the engine thread to the consumer's event loop.

    Outputs are cumulative, so only the newest is kept: a consumer that falls behind (a slow client) skips the
    states in between instead of piling them up, and a request never holds more than one pending output. An error
    is delivered after the output before it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._output: RequestOutput | None = None
        self._error: BaseException | None = None
        self._ended = False  # a finished output or an error was put: nothing after it counts
        self._ready = asyncio.Event()

    def put(self, item: RequestOutput | BaseException) -> None:
        """From the engine thread."""
        # A closed consumer loop (RuntimeError) means nobody is left to tell; it must not stop the engine thread.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._set, item)

    def _set(self, item: RequestOutput | BaseException) -> None:
        if self._ended:
            return
        if isinstance(item, BaseException):
            self._error = item
            self._ended = True
        else:
            self._output = item
            self._ended = item.finished
        self._ready.set()

    async def get(self) -> RequestOutput | BaseException:
        await self._ready.wait()
        if self._output is not None:
            item: RequestOutput | BaseException = self._output
            self._output = None
            if self._error is None:
                self._ready.clear()
            return item
        assert self._error is not None
        return self._error


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_queued_requests: int | None = None) -> None:
        if max_queued_requests is not None and max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be >= 1 or None, got {max_queued_requests}")
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._accepting = False
        self._error: BaseException | None = None
        self._num_pending_adds = 0

    # ----------------------------------------------------------------- lifecycle
    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    @property
    def is_running(self) -> bool:
        """True while the engine thread serves requests (False once shut down or crashed)."""
        return (self._error is None and self._thread is not None and self._thread.is_alive()
                and getattr(self.engine.model_runner, "healthy", True))  # a parallel runner: every worker alive

    @property
    def error(self) -> BaseException | None:
        """The exception that stopped the engine loop, if one did."""
        return self._error

    async def start(self) -> None:
        if self.is_running:
            return
        self._stopping = False
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="mixtral-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Stop accepting requests; let running ones finish for up to ``drain_timeout`` seconds (None: no
        waiting), abort the rest (their streams end with finish_reason "abort") and stop the thread."""
        self._accepting = False
        if self._thread is None:
            return
        if drain_timeout:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + drain_timeout
            while self._streams and loop.time() < deadline and self.is_running:
                await asyncio.sleep(0.02)
        done = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()

        def stop() -> None:
            for out in self.engine.abort_request(list(self._streams)):
                stream = self._streams.pop(out.request_id, None)
                if stream is not None:
                    stream.put(out)
            self._stopping = True
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

        if self.is_running:
            self._submit(stop)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done, timeout=30)
        thread, self._thread = self._thread, None
        await asyncio.to_thread(thread.join, 30)
        self.engine.shutdown()

    # ----------------------------------------------------------------- requests
    async def generate(self, prompt: str | list[int], sampling_params: SamplingParams | None, request_id: str
                       ) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative output each time it advances; the last one has ``finished``.

        Raises the engine's admission errors (``RequestTooLongError``, ``ValueError``) before yielding,
        ``EngineOverloadedError`` when the queue is full, ``EngineDeadError`` when the engine stopped.
        """
        self._check_alive()
        if not self._accepting:
            raise EngineDeadError("the engine is shutting down and accepts no new requests")
        if self.max_queued_requests is not None:
            queued = self.engine.scheduler.waiting.__len__() + self._num_pending_adds
            if queued >= self.max_queued_requests:
                raise EngineOverloadedError(
                    f"{queued} requests are already queued (max_queued_requests={self.max_queued_requests}); "
                    f"retry later"
                )
        loop = asyncio.get_running_loop()
        stream = _Stream(loop)
        admitted: asyncio.Future[None] = loop.create_future()

        def add() -> None:
            self._num_pending_adds -= 1
            try:
                if self._stopping or self._error is not None:
                    raise EngineDeadError("the engine stopped before this request was admitted")
                if request_id in self._streams:
                    raise ValueError(f"request id {request_id!r} is already in use")
                self.engine.add_request(request_id, prompt, sampling_params)
                self._streams[request_id] = stream
            except BaseException as exc:  # handed to the caller
                loop.call_soon_threadsafe(_set_exception, admitted, exc)
                return
            loop.call_soon_threadsafe(_set_result, admitted)

        self._num_pending_adds += 1
        self._submit(add)
        finished = False
        try:
            # Inside the try: a consumer cancelled while its request waits for admission must abort it too (the
            # queued add still runs and would otherwise generate for nobody).
            await admitted
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise EngineDeadError("the engine stopped while serving this request") from item
                finished = item.finished
                yield item
        finally:
            if not finished:
                # Consumer went away (cancelled / disconnected): free the request's blocks.
                self._submit(lambda: self._abort_now(request_id, stream))

    async def abort(self, request_id: str) -> None:
        self._submit(lambda: self._abort_now(request_id))

    async def abort_all(self) -> int:
        """Abort every request now (a drain that ran out of time): each stream ends with finish_reason "abort"
        and the requests' blocks are freed. Returns how many were aborted; admission stays as it was."""
        if not self.is_running:
            return 0
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int] = loop.create_future()

        def cut() -> None:
            ids = list(self._streams)
            for out in self.engine.abort_request(ids):
                stream = self._streams.pop(out.request_id, None)
                if stream is not None:
                    stream.put(out)
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(len(ids)))

        self._submit(cut)
        try:
            return await asyncio.wait_for(done, timeout=30)
        except asyncio.TimeoutError:
            return 0

    def get_stats(self) -> EngineStats:
        return self.engine.get_stats()

    @property
    def stats(self) -> EngineStats:
        return self.engine.get_stats()

    def expert_counts(self) -> torch.Tensor:
        return self.engine.expert_counts()

    # ----------------------------------------------------------------- the engine thread
    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.put(command)
        self._wake.set()

    def _abort_now(self, request_id: str, owner: _Stream | None = None) -> None:
        """Abort ``request_id``; with ``owner``, only if that stream still serves it (the id is not another's:
        admission may have refused it as a duplicate, or it finished and the id was reused)."""
        if owner is not None and self._streams.get(request_id) is not owner:
            return
        stream = self._streams.pop(request_id, None)
        for out in self.engine.abort_request(request_id):
            if stream is not None:
                stream.put(out)

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._wake.clear()  # before draining, so a command submitted meanwhile wakes the wait below
                while True:
                    try:
                        command = self._commands.get_nowait()
                    except queue.Empty:
                        break
                    command()
                if self._stopping:
                    break
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(timeout=0.5)
                    continue
                for out in self.engine.step():
                    stream = self._streams.get(out.request_id)
                    if stream is None:
                        continue
                    if out.finished:
                        del self._streams[out.request_id]
                    stream.put(out)
        except BaseException as exc:  # reported to every waiting consumer
            logger.exception("engine loop crashed")
            self._error = exc
            for stream in self._streams.values():
                stream.put(exc)
            self._streams.clear()
        finally:
            # Commands submitted after the loop ended would never run: fail their callers.
            while True:
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                with contextlib.suppress(Exception):
                    command()

    def _check_alive(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"the engine loop crashed: {self._error!r}") from self._error
        if not self.is_running:
            raise EngineDeadError("the engine is not running; call `await engine.start()` first")


def _set_result(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _set_exception(fut: asyncio.Future[None], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)

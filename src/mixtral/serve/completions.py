"""POST /v1/completions: plain prompts (text or token ids, one or a batch) continued by the model, no chat template.

What scoring clients (lm-evaluation-harness's ``local-completions``) rely on, as vLLM does it:
- ``prompt`` is a string, a list of token ids, or a list of either (a batch): each prompt is its own engine
  request, run together; choice ``index`` is ``prompt_index * n + sample``;
- ``echo`` puts the prompt before each choice's text; with ``logprobs: k`` the legacy ``logprobs`` then cover the
  prompt's tokens too (the first one null: nothing predicts it), with ``text_offset``;
- ``max_tokens: 0`` scores without generating: the prompt runs through the model once and no token is returned;
- ``prompt_logprobs: k`` (vLLM's) returns, per choice, each prompt token's logprob with the top k alternatives;
- ``return_routing`` / ``return_prompt_routing`` (serve/routing.py) add each choice's ``routing`` (streamed: the
  routing of each chunk's new tokens, the prompt's with a choice's first chunk); scoring returns no generated token,
  so its ``routing.tokens`` is empty and only the prompt's routing says anything.
Text prompts are encoded with ``<s>`` first, as the model saw documents in pre-training. FIM (``suffix``) and
``best_of`` are not supported (422).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from mixtral.sampling import SamplingParams
from mixtral.serve.errors import APIError, error_body, logger
from mixtral.serve.generate import collect_until_disconnect, finish_reason_of, stream_outputs
from mixtral.serve.logprobs import format_prompt_logprobs, legacy_logprobs
from mixtral.serve.params import check_token_ids, sampling_params
from mixtral.serve.protocol import CompletionRequest
from mixtral.serve.responses import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    PromptLogprobs,
    UsageInfo,
    wire,
)
from mixtral.serve.routing import RoutingBuilder, routing_params
from mixtral.serve.sse import DONE, EventStreamResponse, sse_event
from mixtral.serve.state import ServerState
from mixtral.serve.structured import structured_guide


async def merge_outputs(iterators: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """(which iterator, its item) as items arrive from any of them. However the consumer stops, every iterator is
    closed (an unfinished engine request is aborted by its own ``finally``)."""
    pending = {asyncio.ensure_future(it.__anext__()): i for i, it in enumerate(iterators)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(iterators[i].__anext__())] = i
                yield i, item
    finally:
        for task in pending:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*pending, return_exceptions=True)
            for it in iterators:
                aclose = getattr(it, "aclose", None)
                if aclose is not None:
                    await aclose()


class CompletionHandler:
    def __init__(self, state: ServerState, req: CompletionRequest, request: Request) -> None:
        self.state = state
        self.req = req
        self.request = request
        state.model.resolve(req.model)
        req.check()
        self.id = state.new_request_id("cmpl")
        self.created = int(time.time())
        self.n = req.n or 1
        self.scoring = req.max_tokens == 0  # run the prompt, return no generated token
        # The prompt's logprobs are computed when asked for directly, or for echo + logprobs.
        echo_logprobs = bool(req.echo) and req.logprobs is not None
        self.prompt_k: int | None = None
        if req.prompt_logprobs is not None or echo_logprobs:
            self.prompt_k = max(req.prompt_logprobs or 0, (req.logprobs or 0) if echo_logprobs else 0)
        self.routing = RoutingBuilder.for_request(req, state.tokenizer, state.model.args)  # None: not asked

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.state.tokenizer.encode(prompt, bos=True)
        check_token_ids(prompt, self.state.tokenizer.vocab_size, "prompt")
        return list(prompt)

    def _params(self, prompts: list[list[int]]) -> list[SamplingParams]:
        state, req = self.state, self.req
        structured = req.structured()
        guide = None if self.scoring else structured_guide(state.tokenizer, structured, chat=False)
        out = []
        for i, ids in enumerate(prompts):
            params = sampling_params(req, prompt_tokens=len(ids), max_model_len=state.model.max_model_len,
                                     vocab_size=state.tokenizer.vocab_size, max_num_seqs=state.model.max_num_seqs,
                                     logprobs=req.logprobs, guide=guide.copy() if guide is not None and i else guide,
                                     max_tokens=1 if self.scoring else None)
            if params.prompt_logprobs != self.prompt_k:
                params = dataclasses.replace(params, prompt_logprobs=self.prompt_k)
            out.append(routing_params(req, params))
        return out

    async def run(self) -> Response:
        state, req = self.state, self.req
        raw = req.prompts
        prompts = [self._prompt_ids(p) for p in raw]
        # Compiling a grammar takes milliseconds: off the event loop.
        params = await anyio.to_thread.run_sync(self._params, prompts)
        self.echo = [(p if isinstance(p, str) else state.tokenizer.decode(ids)) if req.echo else ""
                     for p, ids in zip(raw, prompts, strict=True)]
        trackers: list[Any] = []
        try:
            for _ in prompts:
                trackers.append(state.admit())
            iterators = [stream_outputs(state, tracker, ids, p, f"{self.id}-{i}")
                         for i, (tracker, ids, p) in enumerate(zip(trackers, prompts, params, strict=True))]
        except BaseException:
            for tracker in trackers:
                tracker.release()
            raise

        def release() -> None:
            for tracker in trackers:
                tracker.release()

        if req.stream:
            return EventStreamResponse(self._events(merge_outputs(iterators), prompts), on_close=release)
        try:
            finals = await collect_until_disconnect(self.request, self._finals(iterators))
        finally:
            release()
        if finals is None:
            return Response(status_code=499)  # the client hung up: nobody is left to read it
        if any(finish_reason_of(o.finish_reason) == "error" for final in finals for o in final.outputs):
            raise APIError(503, "the request was aborted because the server is shutting down",
                           code="shutting_down", headers={"Retry-After": "1"})
        return JSONResponse(wire(self._response(finals, prompts)))

    async def _finals(self, iterators: list[AsyncIterator[Any]]) -> AsyncIterator[list[Any]]:
        """One item: every prompt's final output, in prompt order."""
        finals: list[Any] = [None] * len(iterators)
        async for i, out in merge_outputs(iterators):
            finals[i] = out
        yield finals

    # ---------------------------------------------------------------- pieces of a choice
    def _prompt_part(self, p: int, final: Any) -> tuple[list[int], list[dict[int, float] | None]]:
        """The prompt's ids and logprob entries as the legacy logprobs show them (echo only)."""
        if not self.req.echo:
            return [], []
        ids = list(final.prompt_token_ids)
        entries = list(final.prompt_logprobs or [None] * len(ids))
        return ids, entries

    def _prompt_logprobs(self, final: Any) -> PromptLogprobs | None:
        if self.req.prompt_logprobs is None or final.prompt_logprobs is None:
            return None
        return format_prompt_logprobs(self.state.tokenizer, final.prompt_token_ids, final.prompt_logprobs,
                                      self.req.prompt_logprobs)

    def _logprobs(self, ids: list[int], entries: list[dict[int, float] | None], start_offset: int
                  ) -> CompletionLogprobs | None:
        if self.req.logprobs is None:
            return None
        return legacy_logprobs(self.state.tokenizer, ids, entries, start_offset)

    def _usage(self, prompts: list[list[int]], completion: int, cached: int) -> UsageInfo:
        prompt_tokens = sum(len(p) for p in prompts)
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion,
                         total_tokens=prompt_tokens + completion, prompt_tokens_details={"cached_tokens": cached})

    def _response(self, finals: list[Any], prompts: list[list[int]]) -> CompletionResponse:
        choices = []
        completion = 0
        for p, final in enumerate(finals):
            for o in final.outputs:
                ids, entries = self._prompt_part(p, final)
                gen_ids = [] if self.scoring else list(o.token_ids)
                completion += len(gen_ids)
                ids += gen_ids
                entries += list(o.logprobs or [None] * len(gen_ids)) if gen_ids else []
                reason = "length" if self.scoring else finish_reason_of(o.finish_reason)
                choices.append(CompletionChoice(
                    index=p * self.n + o.index, text=self.echo[p] + ("" if self.scoring else o.text),
                    finish_reason=reason, logprobs=self._logprobs(ids, entries, 0),
                    prompt_logprobs=self._prompt_logprobs(final), routing=self._choice_routing(final, o)))
        cached = sum(final.num_cached_tokens or 0 for final in finals)
        return CompletionResponse(id=self.id, created=self.created, model=self.req.model, choices=choices,
                                  usage=self._usage(prompts, completion, cached))

    def _choice_routing(self, final: Any, sample: Any) -> dict[str, Any] | None:
        if self.routing is None:
            return None
        if self.scoring:  # the one token the engine ran is not returned: neither is its routing
            return {"num_layers": self.routing.num_layers, "top_k": self.routing.top_k, "tokens": [],
                    "prompt_tokens": self.routing.prompt_entries(final)}
        return self.routing.choice(final, sample)

    # ---------------------------------------------------------------- streaming
    def _chunk(self, choices: list[CompletionChoice], usage: UsageInfo | None = None) -> bytes:
        return sse_event(wire(CompletionResponse(id=self.id, created=self.created, model=self.req.model,
                                                 choices=choices, usage=usage)))

    async def _events(self, outputs: AsyncIterator[tuple[int, Any]], prompts: list[list[int]]
                      ) -> AsyncIterator[bytes]:
        n, req = self.n, self.req
        total = len(prompts) * n
        sent_text = [""] * total
        sent_tokens = [0] * total
        offset = [0] * total  # characters of the choice's text (echo included) already sent
        started = [False] * total
        done = [False] * total
        generated = [0] * len(prompts)
        cached = [0] * len(prompts)
        usage_apart = req.include_usage
        routing = [self.routing.stream(n) for _ in prompts] if self.routing is not None else None
        try:
            async for p, out in outputs:
                chunks: list[CompletionChoice] = []
                for o in out.outputs:
                    k = p * n + o.index
                    if done[k]:
                        continue
                    if not started[k]:
                        started[k] = True
                        ids, entries = self._prompt_part(p, out)
                        plp = self._prompt_logprobs(out)
                        if self.echo[p] or plp is not None:
                            chunks.append(CompletionChoice(index=k, text=self.echo[p], finish_reason=None,
                                                           logprobs=self._logprobs(ids, entries, 0) if ids else None,
                                                           prompt_logprobs=plp))
                            offset[k] = len(self.echo[p])
                    if self.scoring:
                        if o.finished:
                            done[k] = True
                            scored = None
                            if self.routing is not None and self.routing.include_prompt:
                                scored = {"tokens": [], "prompt_tokens": self.routing.prompt_entries(out)}
                            chunks.append(CompletionChoice(index=k, text="", finish_reason="length", routing=scored))
                        continue
                    delta = o.text[len(sent_text[k]):] if o.text.startswith(sent_text[k]) else ""
                    new_ids = o.token_ids[sent_tokens[k]:]
                    logprobs = None
                    if new_ids and req.logprobs is not None:
                        logprobs = self._logprobs(list(new_ids), list((o.logprobs or [])[sent_tokens[k]:]), offset[k])
                    reason = finish_reason_of(o.finish_reason) if o.finished else None
                    done[k] = o.finished
                    token_routing = routing[p].delta(out, o) if routing is not None and new_ids else None
                    if delta or reason or new_ids:
                        chunks.append(CompletionChoice(index=k, text=delta, finish_reason=reason, logprobs=logprobs,
                                                       routing=token_routing))
                    sent_text[k], sent_tokens[k] = o.text, len(o.token_ids)
                    offset[k] += len(delta)
                if out.finished:
                    generated[p] = 0 if self.scoring else sum(len(o.token_ids) for o in out.outputs)
                    cached[p] = out.num_cached_tokens or 0
                usage = self._usage(prompts, sum(generated), sum(cached)) if all(done) else None
                for j, choice in enumerate(chunks):
                    last = usage is not None and not usage_apart and j == len(chunks) - 1
                    yield self._chunk([choice], usage if last else None)
                if usage is not None and (usage_apart or not chunks):
                    yield self._chunk([], usage)
        except APIError as exc:
            yield sse_event(error_body(exc.status, exc.message, param=exc.param, code=exc.code))
        except Exception as exc:
            logger.exception("error while streaming %s", self.id)
            yield sse_event(error_body(500, f"internal server error: {type(exc).__name__}: {exc}"))
        finally:
            # Closing the merged outputs closes (aborts) every unfinished request now, not when collected.
            aclose = getattr(outputs, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
        yield DONE

"""POST /v1/completions: a plain prompt (text or token ids) continued by the model, no chat template.

Text prompts are encoded with ``<s>`` first, as the model saw documents in pre-training. ``echo`` prepends the
prompt's text to each choice. ``logprobs: k`` returns vLLM/OpenAI legacy-style logprobs of the generated tokens.
FIM (``suffix``) and ``best_of`` are not supported (422).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from mixtral.engine.outputs import CompletionOutput, RequestOutput
from mixtral.serve.errors import APIError, error_body, logger
from mixtral.serve.generate import finish_reason_of, run_request
from mixtral.serve.params import check_token_ids, sampling_params
from mixtral.serve.protocol import CompletionChoice, CompletionRequest, CompletionResponse, UsageInfo
from mixtral.serve.sse import DONE, sse_event
from mixtral.serve.state import ServerState


def _legacy_logprobs(state: ServerState, out: CompletionOutput, start: int) -> dict[str, Any]:
    tok = state.tokenizer
    ids = out.token_ids[start:]
    lps = (out.logprobs or [])[start:]
    return {
        "tokens": [tok.piece_texts[t] for t in ids],
        "token_logprobs": [float(d.get(t, float("-inf"))) for t, d in zip(ids, lps, strict=False)],
        "top_logprobs": [{tok.piece_texts[k]: float(v) for k, v in d.items()} for d in lps],
    }


class CompletionHandler:
    def __init__(self, state: ServerState, req: CompletionRequest, request: Request) -> None:
        self.state = state
        self.req = req
        self.request = request
        state.model.resolve(req.model)
        self.id = state.new_request_id("cmpl")
        self.created = int(time.time())

    def _prompt_ids(self) -> list[int]:
        prompt = self.req.prompt
        if isinstance(prompt, str):
            return self.state.tokenizer.encode(prompt, bos=True)
        check_token_ids(prompt, self.state.tokenizer.vocab_size, "prompt")
        return list(prompt)

    async def run(self) -> Response:
        state, req = self.state, self.req
        prompt_ids = self._prompt_ids()
        params = sampling_params(req, prompt_tokens=len(prompt_ids), max_model_len=state.model.max_model_len,
                                 vocab_size=state.tokenizer.vocab_size, max_num_seqs=state.model.max_num_seqs,
                                 logprobs=req.logprobs)
        self.echo = (req.prompt if isinstance(req.prompt, str) else state.tokenizer.decode(prompt_ids)) \
            if req.echo else ""
        final = await run_request(state, self.request, prompt_ids, params, self.id, bool(req.stream), self._events)
        if isinstance(final, Response):
            return final
        choices = [CompletionChoice(index=o.index, text=self.echo + o.text,
                                    finish_reason=finish_reason_of(o.finish_reason),
                                    logprobs=_legacy_logprobs(state, o, 0) if req.logprobs is not None else None)
                   for o in final.outputs]
        completion = sum(len(o.token_ids) for o in final.outputs)
        resp = CompletionResponse(id=self.id, created=self.created, model=req.model, choices=choices,
                                  usage=UsageInfo(prompt_tokens=len(prompt_ids), completion_tokens=completion,
                                                  total_tokens=len(prompt_ids) + completion,
                                                  prompt_tokens_details={"cached_tokens": final.num_cached_tokens}))
        data = resp.model_dump(exclude_none=True)
        for choice, obj in zip(data["choices"], choices, strict=True):
            choice["finish_reason"] = obj.finish_reason
        return JSONResponse(data)

    def _chunk(self, index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None,
               usage: UsageInfo | None = None) -> bytes:
        resp = CompletionResponse(id=self.id, created=self.created, model=self.req.model, usage=usage,
                                  choices=[CompletionChoice(index=index, text=text, finish_reason=finish_reason,
                                                            logprobs=logprobs)])
        data = resp.model_dump(exclude_none=True)
        data["choices"][0]["finish_reason"] = finish_reason
        return sse_event(data)

    async def _events(self, outputs: AsyncIterator[RequestOutput], prompt_tokens: int) -> AsyncIterator[bytes]:
        n = self.req.n or 1
        sent_text = [""] * n
        sent_tokens = [0] * n
        done = [False] * n
        try:
            if self.echo:
                for i in range(n):
                    yield self._chunk(i, self.echo, None, None)
            async for out in outputs:
                chunks = []
                for o in out.outputs:
                    i = o.index
                    if done[i]:
                        continue
                    delta = o.text[len(sent_text[i]):] if o.text.startswith(sent_text[i]) else ""
                    logprobs = _legacy_logprobs(self.state, o, sent_tokens[i]) if self.req.logprobs is not None \
                        else None
                    reason = finish_reason_of(o.finish_reason) if o.finished else None
                    done[i] = o.finished
                    if delta or reason or len(o.token_ids) > sent_tokens[i]:
                        chunks.append((i, delta, reason, logprobs))
                    sent_text[i], sent_tokens[i] = o.text, len(o.token_ids)
                usage = None
                if out.finished:
                    completion = sum(len(o.token_ids) for o in out.outputs)
                    usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion,
                                      total_tokens=prompt_tokens + completion,
                                      prompt_tokens_details={"cached_tokens": out.num_cached_tokens})
                    if not chunks:
                        chunks.append((0, "", None, None))
                for k, (i, delta, reason, logprobs) in enumerate(chunks):
                    yield self._chunk(i, delta, reason, logprobs, usage if k == len(chunks) - 1 else None)
        except APIError as exc:
            yield sse_event(error_body(exc.status, exc.message, param=exc.param, code=exc.code))
        except Exception as exc:
            logger.exception("error while streaming %s", self.id)
            yield sse_event(error_body(500, f"internal server error: {type(exc).__name__}: {exc}"))
        yield DONE

"""POST /v1/chat/completions: prompt encoding, guided decoding, the JSON answer and the SSE stream.

Flow: validated request -> mistral-common prompt (``Tokenizer.encode_chat``; ``safe_prompt`` prepends Mistral's
guardrail system prompt) -> guide for tools / response_format / vLLM's guided_* -> SamplingParams with the
context checks -> admission -> engine. Outputs that open with ``[TOOL_CALLS]`` become ``tool_calls`` with
``content: ""`` and ``finish_reason: "tool_calls"`` (``"length"`` when max_tokens cut the call: still in
``tool_calls``, see ``tools.partial_tool_calls``); when streaming, text is sent as it is generated and a tool call is
sent whole in one delta once it is complete (as Mistral's API does), followed by the chunk with the finish reason
and usage (with ``stream_options.include_usage``, the usage comes in a last chunk of its own with ``choices: []``,
as OpenAI's clients expect). ``prompt_logprobs`` (vLLM's) come in the response, or in a choice-less chunk.
``return_routing`` / ``return_prompt_routing`` (serve/routing.py) add ``routing`` to each choice, and to each
streamed delta the routing of its new tokens (a tool call's with the call; the prompt's with a choice's first).

A reply continues the last message instead of opening a new one when that message is an assistant one marked
``prefix`` (Mistral) or the request says ``continue_final_message`` / ``add_generation_prompt: false`` (vLLM).

Histories are taken as clients echo them back: an assistant turn with text beside its tool calls keeps only the
calls (v3 prompts have no place for both), and an empty assistant turn before the last message is skipped. The
reply's word-start space after ``[/INST]`` is not part of it.

Tools on a model whose tokenizer has no tool tokens (v1, Mixtral-8x7B): with ``tool_choice: "none"`` the tools are
dropped and the model answers in text; any other ``tool_choice`` is a 400 saying function calling needs a
v3-tokenizer model. The model card advertises ``function_calling: false`` for such a model.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from mixtral.engine.outputs import CompletionOutput, RequestOutput
from mixtral.guide import TokenGuide
from mixtral.serve.errors import APIError, error_body, logger
from mixtral.serve.generate import finish_reason_of, run_request
from mixtral.serve.logprobs import format_prompt_logprobs
from mixtral.serve.params import sampling_params
from mixtral.serve.protocol import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatMessage,
    JsonSchemaResponseFormat,
    NamedToolChoice,
    SystemMessage,
    TextFormat,
    Tool,
    content_text,
)
from mixtral.serve.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatMessageOut,
    ChoiceLogprobs,
    DeltaMessage,
    LogprobEntry,
    PromptLogprobs,
    TopLogprob,
    UsageInfo,
    wire,
)
from mixtral.serve.routing import RoutingBuilder, RoutingStream, routing_params
from mixtral.serve.sse import DONE, sse_event
from mixtral.serve.state import ServerState
from mixtral.serve.structured import structured_guide
from mixtral.serve.tools import partial_tool_calls, starts_with_tool_call, tool_calls_from_output

# Mistral's guardrail system prompt, prepended when a request sets safe_prompt=true.
SAFE_PROMPT = ("Always assist with care, respect, and truth. Respond with utmost utility yet securely. "
               "Avoid harmful, unethical, prejudiced, or negative content. Ensure replies promote fairness "
               "and positivity.")


def messages_for_tokenizer(messages: list[ChatMessage], *, continue_last: bool, safe_prompt: bool = False
                           ) -> list[dict[str, Any]]:
    """The messages as the tokenizer takes them; ``continue_last`` makes the last (assistant) message a prefix the
    reply continues. A ``prefix`` flag on an earlier message means nothing there and is dropped."""
    out = []
    if safe_prompt:
        out.append({"role": "system", "content": SAFE_PROMPT})
    last = len(messages) - 1
    for index, msg in enumerate(messages):
        if (isinstance(msg, AssistantMessage) and index < last and not msg.tool_calls
                and not content_text(msg.content)):
            # An empty reply (the model stopped at once) that the client sends back: it says nothing, and
            # mistral-common cannot encode an empty turn; the user turns around it are read as one.
            continue
        d = msg.model_dump(exclude_none=True)
        if isinstance(msg, SystemMessage):
            d["role"] = "system"
        if isinstance(msg, AssistantMessage):
            d.pop("prefix", None)
            if index == last and continue_last:
                d["prefix"] = True
        if isinstance(msg, AssistantMessage) and msg.tool_calls:
            # OpenAI-style histories may pair text with the calls ("Let me check." + a call). The v3 format has
            # no place for it (a turn is text or [TOOL_CALLS], and mistral-common refuses both): keep the calls,
            # which the tool results that follow answer.
            d.pop("content", None)
        if "content" not in d and not isinstance(msg, AssistantMessage):
            d["content"] = ""
        out.append(d)
    return out


def encode_messages(state: ServerState, messages: list[dict[str, Any]], tools: list[Tool] | None) -> list[int]:
    """Prompt ids of tokenizer-ready messages (400 naming the problem when mistral-common refuses them)."""
    from mixtral.tokenizer import ChatEncodingError

    tool_dicts = [{"type": "function", "function": {"name": t.function.name, "description": t.function.description,
                                                    "parameters": t.function.parameters}} for t in tools or []] or None
    try:
        return state.tokenizer.encode_chat(messages, tool_dicts)
    except ChatEncodingError as exc:
        raise APIError(400, f"messages: {exc}", param="messages", code="invalid_messages") from exc


def _tools_active(state: ServerState, req: ChatCompletionRequest) -> bool:
    """Whether the request's tools reach the prompt (see the module docstring for v1 models)."""
    if not req.tools:
        return False
    if state.model.supports_tools:
        return True
    if req.tool_choice == "none":
        return False
    raise APIError(400, f"model {state.model.name!r} uses tokenizer {state.model.args.tokenizer}, which has no "
                        "tool-call tokens, so it cannot call functions; use a model with tokenizer v3 (e.g. "
                        "Mixtral-8x22B-Instruct), or send tool_choice='none' to answer without the tools",
                   param="tools", code="function_calling_unsupported")


def encode_prompt(state: ServerState, req: ChatCompletionRequest, tools_active: bool) -> list[int]:
    messages = messages_for_tokenizer(req.messages, continue_last=req.continues_last_message,
                                      safe_prompt=bool(req.safe_prompt))
    return encode_messages(state, messages, req.tools if tools_active else None)


def build_request_guide(state: ServerState, req: ChatCompletionRequest, tools_active: bool) -> TokenGuide | None:
    """The TokenGuide constraining this request's output, or None."""
    structured = req.structured()
    if structured is not None:
        if tools_active and req.tool_choice != "none":
            raise APIError(400, "tools cannot be combined with guided_* / structured_outputs; send one of them",
                           param="tools", code="invalid_guide")
        return structured_guide(state.tokenizer, structured, chat=True)
    fmt = req.response_format
    fmt_dict = None
    if fmt is not None and not isinstance(fmt, TextFormat):
        fmt_dict = fmt.model_dump(by_alias=True, exclude_none=True)
        if isinstance(fmt, JsonSchemaResponseFormat):
            fmt_dict["json_schema"]["schema"] = fmt.json_schema.schema_
    if not tools_active and fmt_dict is None:
        return None
    from mixtral.serve.guided import GuideError, build_guide

    choice = req.tool_choice_or_default
    if isinstance(choice, NamedToolChoice):
        choice = choice.model_dump()
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []] if tools_active else None
    try:
        return build_guide(state.tokenizer, tools=tools, tool_choice=choice if tools_active else "auto",
                           response_format=fmt_dict, parallel_tool_calls=bool(req.parallel_tool_calls))
    except GuideError as exc:
        raise APIError(400, str(exc), param="response_format" if not tools_active else "tools",
                       code="invalid_guide") from exc


def _logprob_entries(state: ServerState, token_ids: list[int], logprobs: list[dict[int, float]] | None,
                     top: int) -> list[LogprobEntry]:
    tok = state.tokenizer
    out = []
    for tid, alts in zip(token_ids, logprobs or [], strict=False):
        ranked = sorted(alts.items(), key=lambda kv: -kv[1])[:top]
        out.append(LogprobEntry(
            token=tok.piece_texts[tid], logprob=float(alts.get(tid, float("-inf"))),
            bytes=list(tok.token_bytes(tid)),
            top_logprobs=[TopLogprob(token=tok.piece_texts[t], logprob=float(lp), bytes=list(tok.token_bytes(t)))
                          for t, lp in ranked],
        ))
    return out


def _usage(prompt_tokens: int, completion_tokens: int, cached: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens,
                     prompt_tokens_details={"cached_tokens": cached})


class ChatHandler:
    """One chat completion request, from validated body to response."""

    def __init__(self, state: ServerState, req: ChatCompletionRequest, request: Request) -> None:
        self.state = state
        self.req = req
        self.request = request
        self.model_name = state.model.resolve(req.model)
        req.check()
        self.id = state.new_request_id("chatcmpl")
        self.created = int(time.time())
        self.tool_names = [t.function.name for t in req.tools or []]
        self.top_logprobs = (req.top_logprobs or 0) if req.logprobs else 0
        # After [/INST] (or [/TOOL_RESULTS]) the reply's first piece carries SentencePiece's word-start space
        # ("▁Paris"), which is not part of the message: Mistral's API and `mixtral chat` drop it. A prefix
        # message is continued instead, so there the space is real text.
        self.strip_space = not req.continues_last_message
        self.routing = RoutingBuilder.for_request(req, state.tokenizer, state.model.args)  # None: not asked

    async def run(self) -> Response:
        state, req = self.state, self.req
        tools_active = _tools_active(state, req)
        # Encoding a long conversation and compiling a grammar take milliseconds: keep them off the event loop.
        prompt_ids, guide = await anyio.to_thread.run_sync(self._prepare, tools_active)
        params = sampling_params(req, prompt_tokens=len(prompt_ids), max_model_len=state.model.max_model_len,
                                 vocab_size=state.tokenizer.vocab_size, max_num_seqs=state.model.max_num_seqs,
                                 logprobs=self.top_logprobs if req.logprobs else None, guide=guide)
        params = routing_params(req, params)
        final = await run_request(state, self.request, prompt_ids, params, self.id, bool(req.stream), self._events)
        if isinstance(final, Response):
            return final
        if finish_reason_of(final.outputs[0].finish_reason) == "error":
            raise APIError(503, "the request was aborted because the server is shutting down",
                           code="shutting_down", headers={"Retry-After": "1"})
        response = self._response(final, len(prompt_ids))
        response.prompt_logprobs = self._prompt_logprobs(final)
        return JSONResponse(wire(response))

    def _prompt_logprobs(self, out: Any) -> PromptLogprobs | None:
        if self.req.prompt_logprobs is None or out.prompt_logprobs is None:
            return None
        return format_prompt_logprobs(self.state.tokenizer, out.prompt_token_ids, out.prompt_logprobs,
                                      self.req.prompt_logprobs)

    def _prepare(self, tools_active: bool) -> tuple[list[int], TokenGuide | None]:
        prompt_ids = encode_prompt(self.state, self.req, tools_active)
        return prompt_ids, build_request_guide(self.state, self.req, tools_active)

    def _text(self, out: CompletionOutput) -> str:
        """The reply text of one output (cumulative, so streaming can diff it)."""
        text = out.text
        return text[1:] if self.strip_space and text.startswith(" ") else text

    # ---------------------------------------------------------------- non-streaming
    def _message(self, out: CompletionOutput) -> tuple[ChatMessageOut, str | None]:
        tok = self.state.tokenizer
        calls = tool_calls_from_output(tok, out.token_ids, self.tool_names) if self.tool_names else None
        if calls is not None:
            return ChatMessageOut(content="", tool_calls=calls), "tool_calls"
        if self.tool_names and out.finish_reason == "length" and starts_with_tool_call(out.token_ids,
                                                                                        tok.tool_calls_id):
            # A call cut off by max_tokens: still a tool call, never text (OpenAI's shape for it).
            return ChatMessageOut(content="", tool_calls=partial_tool_calls(tok, out.token_ids)), "length"
        return ChatMessageOut(content=self._text(out)), finish_reason_of(out.finish_reason)

    def _response(self, final: RequestOutput, prompt_tokens: int) -> ChatCompletionResponse:
        choices = []
        for out in final.outputs:
            message, reason = self._message(out)
            logprobs = None
            if self.req.logprobs:
                logprobs = ChoiceLogprobs(content=_logprob_entries(self.state, out.token_ids, out.logprobs,
                                                                   self.top_logprobs))
            routing = self.routing.choice(final, out) if self.routing is not None else None
            choices.append(ChatChoice(index=out.index, message=message, finish_reason=reason, logprobs=logprobs,
                                      routing=routing))
        completion = sum(len(o.token_ids) for o in final.outputs)
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.req.model, choices=choices,
                                      usage=_usage(prompt_tokens, completion, final.num_cached_tokens or 0))

    # ---------------------------------------------------------------- streaming
    def _chunk(self, index: int, delta: DeltaMessage, finish_reason: str | None = None,
               logprobs: ChoiceLogprobs | None = None, usage: UsageInfo | None = None,
               routing: dict[str, Any] | None = None) -> bytes:
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.req.model, usage=usage,
                                    choices=[ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason,
                                                             logprobs=logprobs, routing=routing)])
        return sse_event(wire(chunk))

    def _bare_chunk(self, usage: UsageInfo | None = None, prompt_logprobs: PromptLogprobs | None = None) -> bytes:
        """A chunk without choices: OpenAI's usage chunk (``stream_options.include_usage``), or vLLM's prompt
        logprobs once the prompt has been computed."""
        return sse_event(wire(ChatCompletionChunk(id=self.id, created=self.created, model=self.req.model, choices=[],
                                                  usage=usage, prompt_logprobs=prompt_logprobs)))

    async def _events(self, outputs: AsyncIterator[RequestOutput], prompt_tokens: int) -> AsyncIterator[bytes]:
        n = self.req.n or 1
        tok = self.state.tokenizer
        sent_text = [""] * n
        sent_tokens = [0] * n
        tool_mode: list[bool | None] = [None] * n
        done = [False] * n
        prompt_logprobs_sent = self.req.prompt_logprobs is None
        # OpenAI's clients ask for the usage in a last chunk of its own; Mistral's API sends it unasked, on the
        # chunk that finishes the reply.
        usage_apart = self.req.include_usage
        routing: RoutingStream | None = self.routing.stream(n) if self.routing is not None else None
        try:
            for i in range(n):
                yield self._chunk(i, DeltaMessage(role="assistant", content=""))
            async for out in outputs:
                if not prompt_logprobs_sent and out.prompt_logprobs is not None:
                    prompt_logprobs_sent = True
                    yield self._bare_chunk(prompt_logprobs=self._prompt_logprobs(out))
                # (choice, delta, finish reason, logprobs, routing of the delta's tokens)
                pending: list[tuple[int, DeltaMessage, str | None, ChoiceLogprobs | None, dict[str, Any] | None]] = []
                for o in out.outputs:
                    i = o.index
                    if done[i]:
                        continue
                    if tool_mode[i] is None and o.token_ids:
                        tool_mode[i] = bool(self.tool_names) and starts_with_tool_call(o.token_ids, tok.tool_calls_id)
                    if tool_mode[i] is False:
                        text = self._text(o)
                        delta_text = text[len(sent_text[i]):] if text.startswith(sent_text[i]) else ""
                        logprobs = None
                        if self.req.logprobs and len(o.token_ids) > sent_tokens[i]:
                            logprobs = ChoiceLogprobs(content=_logprob_entries(
                                self.state, o.token_ids[sent_tokens[i]:], (o.logprobs or [])[sent_tokens[i]:],
                                self.top_logprobs))
                        # Routing goes with the tokens as they come, also while their text is held back.
                        token_routing = routing.delta(out, o) if routing is not None else None
                        if delta_text or logprobs is not None or token_routing is not None:
                            pending.append((i, DeltaMessage(content=delta_text), None, logprobs, token_routing))
                            sent_text[i] = text
                            sent_tokens[i] = len(o.token_ids)
                    if o.finished:
                        done[i] = True
                        if tool_mode[i]:
                            message, reason = self._message(o)
                            delta = DeltaMessage(content=message.content, tool_calls=message.tool_calls)
                            call_routing = routing.delta(out, o) if routing is not None else None
                            pending.append((i, delta, None, None, call_routing))
                            pending.append((i, DeltaMessage(content=""), reason, None, None))
                        else:
                            pending.append((i, DeltaMessage(content=""), finish_reason_of(o.finish_reason), None,
                                            None))
                usage = None
                if out.finished:
                    completion = sum(len(o.token_ids) for o in out.outputs)
                    usage = _usage(prompt_tokens, completion, out.num_cached_tokens or 0)
                    if not pending and not usage_apart:  # every sample already finished: usage needs a chunk
                        pending.append((0, DeltaMessage(), None, None, None))
                for k, (i, delta, reason, logprobs, token_routing) in enumerate(pending):
                    last = usage is not None and not usage_apart and k == len(pending) - 1
                    yield self._chunk(i, delta, reason, logprobs, usage if last else None, token_routing)
                if usage is not None and usage_apart:
                    yield self._bare_chunk(usage=usage)
        except APIError as exc:
            yield sse_event(error_body(exc.status, exc.message, param=exc.param, code=exc.code))
        except Exception as exc:  # a bug after the headers went out: report it in-band, keep serving
            logger.exception("error while streaming %s", self.id)
            yield sse_event(error_body(500, f"internal server error: {type(exc).__name__}: {exc}"))
        yield DONE

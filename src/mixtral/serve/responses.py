"""Pydantic models of what the HTTP API sends back: completions, chunks, logprobs, model cards, tokenizer answers.

``model_dump(exclude_none=True)`` is what goes on the wire, except where a field must be present even when null
(each choice's ``finish_reason``: ``wire`` puts it back). The same models are the OpenAPI document's response
schemas, streaming chunks included, so what the document promises is what a client receives.
Requests live in ``protocol.py``; this module knows nothing about the engine or the tokenizer.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from mixtral.serve.routing import ChoiceRouting, DeltaRouting

FinishReason = Literal["stop", "length", "tool_calls", "error"]


def wire(model: BaseModel) -> dict[str, Any]:
    """The JSON a response model goes out as: nulls dropped except each choice's ``finish_reason``."""
    data = model.model_dump(exclude_none=True)
    for choice, obj in zip(data.get("choices", []), getattr(model, "choices", []), strict=True):
        choice["finish_reason"] = obj.finish_reason
    return data


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # OpenAI's place for prompt-cache hits; Mistral clients ignore it.
    prompt_tokens_details: dict[str, int] | None = None


class PromptLogprob(BaseModel):
    """vLLM's per-token entry of ``prompt_logprobs``: keyed by token id (as a string) in a dict per position."""

    logprob: float
    rank: int | None = None  # 1 = the most likely token; None when outside the returned top-k
    decoded_token: str


# Per prompt position: None for the first token (nothing predicts it), else {token id: entry}.
PromptLogprobs = list[dict[str, PromptLogprob] | None]


# --------------------------------------------------------------------------- chat
class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # a JSON string, as both APIs send it (cut short when max_tokens ended the call)


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut
    index: int | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = ""
    tool_calls: list[ToolCallOut] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class LogprobEntry(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[LogprobEntry]


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs | None = None
    routing: ChoiceRouting | None = None  # with return_routing (serve/routing.py)


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's extension, when the request asks for it


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None
    routing: DeltaRouting | None = None  # with return_routing (serve/routing.py)


class ChatCompletionChunk(BaseModel):
    """One ``data:`` event of a streamed chat completion. With ``stream_options.include_usage`` the last event
    before ``[DONE]`` has ``choices: []`` and the usage."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    prompt_logprobs: PromptLogprobs | None = None


# --------------------------------------------------------------------------- text completions
class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs: one entry per token of the choice (prompt tokens first with ``echo``).

    ``token_logprobs[0]`` is null for the prompt's first token (nothing predicts it); ``text_offset`` is each
    token's character offset in the choice's ``text``."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: PromptLogprobs | None = None
    routing: ChoiceRouting | DeltaRouting | None = None  # with return_routing (serve/routing.py)


class CompletionResponse(BaseModel):
    """A text completion, or (``object`` is the same) one ``data:`` event of a streamed one; with
    ``stream_options.include_usage`` the last event has ``choices: []`` and the usage."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# --------------------------------------------------------------------------- models
class ModelCapabilities(BaseModel):
    completion_chat: bool = True
    completion_fim: bool = False
    function_calling: bool = False
    fine_tuning: bool = False
    vision: bool = False
    classification: bool = False


class ModelCard(BaseModel):
    """Mistral's model card (mistralai 1.x+ needs ``type`` to parse it); OpenAI reads id/object/created/owned_by;
    vLLM's clients read ``root`` (the served model an alias points to) and ``max_model_len``."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mixtral"
    type: Literal["base"] = "base"
    name: str | None = None
    description: str | None = None
    capabilities: ModelCapabilities
    max_context_length: int
    max_model_len: int | None = None
    root: str | None = None
    aliases: list[str] = Field(default_factory=list)
    deprecation: str | None = None
    default_model_temperature: float | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --------------------------------------------------------------------------- tokenizer endpoints (vLLM's)
class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfoResponse(BaseModel):
    """What lm-evaluation-harness's remote tokenizer reads: the special tokens' text (``/tokenize`` maps each back
    to its id) and the context length."""

    tokenizer_class: str
    bos_token: str
    eos_token: str
    unk_token: str
    pad_token: str | None = None
    chat_template: str | None = None
    model_max_length: int
    vocab_size: int


# --------------------------------------------------------------------------- errors
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ValidationIssue(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """Every error body: Mistral's flat fields and OpenAI's ``error`` object at once; 422s add FastAPI's ``detail``
    list, which the mistralai SDK parses (see ``errors.py``)."""

    object: Literal["error"] = "error"
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    error: ErrorDetail
    detail: list[ValidationIssue] | None = None

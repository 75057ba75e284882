"""Pydantic schemas of the HTTP API: requests and responses, with Mistral's field names and OpenAI's.

Requests are validated here and nowhere else: a field of the wrong type, out of range or unknown at the top
level becomes a 422 naming the field (see ``errors.py``). Top-level objects forbid unknown fields, because a
typo such as ``max_token`` silently ignored is worse than an error (both hosted APIs reject them too); fields
that real SDKs send but this server has no use for are accepted and ignored (``IGNORED_FIELDS``) or rejected
only when set to something other than their default (``UNSUPPORTED_FIELDS``). Nested objects that clients echo
back from earlier responses (messages, tool calls) ignore unknown keys, so a conversation round-trips whatever a
client library adds to them.

Responses are plain pydantic models; ``model_dump(exclude_none=True)`` is what goes on the wire, except where a
field must be present even when null or empty (``content: ""`` on tool calls, ``finish_reason: null``).
This module knows nothing about the engine or the tokenizer.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from mixtral.serve.routing import ChoiceRouting, DeltaRouting, RoutingRequestFields

# Largest seed both SDKs can send: an unsigned 64-bit value would not fit a signed tensor.
MAX_SEED = 2**63 - 1
MAX_N = 16
MAX_STOP_SEQUENCES = 16
MAX_TOP_LOGPROBS = 20

# Sent by the mistralai / openai SDKs; accepted and ignored (they carry no meaning for a self-hosted model).
IGNORED_FIELDS = ("metadata", "user", "store", "service_tier", "prompt_cache_key", "safety_identifier")
# Features this server does not implement: accepted only when absent, null or empty, else a 422 naming them.
UNSUPPORTED_FIELDS = ("logit_bias", "prediction", "prompt_mode", "reasoning_effort", "guardrails", "modalities",
                      "audio", "web_search_options", "functions", "function_call", "verbosity",
                      "top_prompt_logprobs", "prompt_logprobs", "suffix", "best_of")


# Values of UNSUPPORTED_FIELDS that mean "feature off" (besides None, false and empty containers).
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "reasoning_effort": ("none",), "function_call": ("none", "auto"), "modalities": (["text"],), "best_of": (1,),
    "top_prompt_logprobs": (0,), "suffix": ("",),
}


def _is_off(name: str, value: Any) -> bool:
    if value is None or value is False or (isinstance(value, (dict, list, str)) and not value):
        return True
    return any(value == off and type(value) is type(off) for off in _OFF_VALUES.get(name, ()))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --------------------------------------------------------------------------- messages
class TextChunk(_Lenient):
    type: Literal["text"] = "text"
    text: str


# A message's content: a string, null, or a list of text chunks (images are not supported: Mixtral is text-only).
Content = str | list[TextChunk] | None


def content_text(content: Content) -> str:
    """The text of a message's content, whatever form it came in."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(chunk.text for chunk in content)


class FunctionCall(_Lenient):
    name: str = Field(min_length=1, max_length=256)
    # OpenAI sends a JSON string; Mistral also allows an object.
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_Lenient):
    """A tool call inside an assistant message that a client sends back (echoed ``index`` is ignored)."""

    id: str | None = None
    type: Literal["function"] | None = "function"
    function: FunctionCall


class SystemMessage(_Lenient):
    # OpenAI's newer clients name the system role "developer".
    role: Literal["system", "developer"]
    content: Content


class UserMessage(_Lenient):
    role: Literal["user"]
    content: Content


class AssistantMessage(_Lenient):
    role: Literal["assistant"]
    content: Content = None
    tool_calls: list[ToolCallIn] | None = None
    # Mistral: the message is a prefix the model must continue (only valid as the last message).
    prefix: bool = False


class ToolMessage(_Lenient):
    role: Literal["tool"]
    content: Content
    tool_call_id: str | None = None
    name: str | None = None


ChatMessage = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


# --------------------------------------------------------------------------- tools and formats
class FunctionDefinition(_Lenient):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_json_schema(value)


class Tool(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Lenient):
    name: str = Field(min_length=1)


class NamedToolChoice(_Lenient):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["auto", "none", "any", "required"] | NamedToolChoice


class JsonSchemaFormat(_Lenient):
    name: str = "response"
    description: str | None = None
    # ``schema`` shadows a BaseModel attribute, hence the alias.
    schema_: dict[str, Any] = Field(alias="schema", default_factory=dict)
    strict: bool | None = None

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_json_schema(value)


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type 'json_schema' needs a 'json_schema' object with a 'schema'")
        return self


class StreamOptions(_Lenient):
    include_usage: bool | None = None


def check_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Raise ValueError (-> 422 naming the field) when ``schema`` is not a valid JSON Schema."""
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "(root)"
        raise ValueError(f"invalid JSON Schema at {where}: {exc.message}") from None
    return schema


# --------------------------------------------------------------------------- requests
class _SamplingFields(_Strict, RoutingRequestFields):
    """Fields shared by chat and text completions (Mistral names first, OpenAI aliases resolved below)."""

    model: str = Field(min_length=1, max_length=256)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=1_000_000)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    min_tokens: int | None = Field(default=None, ge=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, max_length=64)
    random_seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    ignore_eos: bool = False
    # Fields real SDKs send that carry no meaning here (see IGNORED_FIELDS / UNSUPPORTED_FIELDS).
    metadata: dict[str, Any] | None = None
    user: str | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    logit_bias: dict[str, float] | None = None
    prediction: dict[str, Any] | None = None
    prompt_mode: str | None = None
    reasoning_effort: str | None = None
    guardrails: list[Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    verbosity: str | None = None

    @field_validator("stream", "ignore_eos", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any) -> Any:
        # OpenAI's spec makes these flags nullable and clients that serialise every field send null: it means
        # the default (false), not a type error.
        return False if value is None else value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @model_validator(mode="after")
    def _unsupported(self) -> _SamplingFields:
        for name in UNSUPPORTED_FIELDS:
            value = getattr(self, name, None)
            if not _is_off(name, value):
                raise ValueError(f"'{name}' is not supported by this server (got {value!r}); leave it unset")
        max_tokens = self.effective_max_tokens
        if self.min_tokens and max_tokens is not None and self.min_tokens > max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) exceeds max_tokens ({max_tokens})")
        if self.seed is not None and self.random_seed is not None and self.seed != self.random_seed:
            raise ValueError(f"'seed' ({self.seed}) and 'random_seed' ({self.random_seed}) disagree; send one")
        return self

    @property
    def effective_seed(self) -> int | None:
        return self.random_seed if self.random_seed is not None else self.seed

    @property
    def effective_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    safe_prompt: bool = False
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    prompt_logprobs: bool | None = None
    top_prompt_logprobs: int | None = None

    @field_validator("safe_prompt", "logprobs", mode="before")
    @classmethod
    def _null_is_false(cls, value: Any) -> Any:
        return False if value is None else value

    @field_validator("parallel_tool_calls", mode="before")
    @classmethod
    def _null_is_true(cls, value: Any) -> Any:
        return True if value is None else value

    @field_validator("tool_choice")
    @classmethod
    def _choice_in_tools(cls, value: ToolChoice | None, info: ValidationInfo) -> ToolChoice | None:
        # A field validator (tools is declared first, so it is in info.data once valid), so that the 422 names
        # tool_choice as its param.
        if "tools" not in info.data:
            return value  # tools itself was invalid: that error is reported
        names = [t.function.name for t in info.data["tools"] or []]
        if isinstance(value, NamedToolChoice) and value.function.name not in names:
            raise ValueError(f"tool_choice names function {value.function.name!r}, which is not in tools {names}")
        if value in ("any", "required") and not names:
            raise ValueError(f"tool_choice={value!r} needs a non-empty 'tools' list")
        return value

    @model_validator(mode="after")
    def _tools_consistent(self) -> ChatCompletionRequest:
        names = [t.function.name for t in self.tools or []]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"tools: function names must be unique, {dupes} appear more than once")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    @property
    def tool_choice_or_default(self) -> str | NamedToolChoice:
        return self.tool_choice if self.tool_choice is not None else "auto"


class CompletionRequest(_SamplingFields):
    """POST /v1/completions: a plain prompt, no chat template."""

    prompt: str | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("echo", mode="before")
    @classmethod
    def _null_is_false(cls, value: Any) -> Any:
        return False if value is None else value

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        # OpenAI also takes a batch (a list of strings or of id lists); say so rather than listing type errors.
        if isinstance(value, list) and value and all(isinstance(v, (str, list)) for v in value):
            raise ValueError(f"batched prompts (a list of {len(value)} strings or token-id lists) are not supported; "
                             f"send one prompt (a string or one list of token ids) per request")
        return value

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: str | list[int]) -> str | list[int]:
        if isinstance(value, str) and not value:
            raise ValueError("prompt must be a non-empty string or a non-empty list of token ids")
        return value


# --------------------------------------------------------------------------- responses
class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # OpenAI's place for prompt-cache hits; Mistral clients ignore it.
    prompt_tokens_details: dict[str, int] | None = None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # a JSON string, as both APIs send it


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut
    index: int | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = ""
    tool_calls: list[ToolCallOut] | None = None


class LogprobEntry(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[dict[str, Any]] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[LogprobEntry]


FinishReason = Literal["stop", "length", "tool_calls", "error"]


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
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: dict[str, Any] | None = None
    routing: ChoiceRouting | DeltaRouting | None = None  # with return_routing (serve/routing.py)


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCapabilities(BaseModel):
    completion_chat: bool = True
    completion_fim: bool = False
    function_calling: bool = False
    fine_tuning: bool = False
    vision: bool = False
    classification: bool = False


class ModelCard(BaseModel):
    """Mistral's model card (mistralai 1.x+ needs ``type`` to parse it); OpenAI reads id/object/created/owned_by."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mixtral"
    type: Literal["base"] = "base"
    name: str | None = None
    description: str | None = None
    capabilities: ModelCapabilities
    max_context_length: int
    aliases: list[str] = Field(default_factory=list)
    deprecation: str | None = None
    default_model_temperature: float | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

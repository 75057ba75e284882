"""Pydantic schemas of the HTTP API's requests, with Mistral's field names, OpenAI's and vLLM's extras.

Two kinds of refusal, and the OpenAPI document tells the truth about the first:
- **422**: the body does not match its schema (wrong type, out of range, unknown top-level field). The schema
  these models publish accepts exactly what they accept: types are strict (``"5"`` is not an integer, ``1`` is
  not a boolean; ``5.0`` is an integer, as in JSON Schema), flags that clients send as ``null`` are nullable in
  the schema too, and fields this server does not implement admit only their "off" values in the schema.
- **400**: well-formed but impossible or self-contradictory, which no JSON schema can state: ``seed`` and
  ``random_seed`` disagreeing, ``min_tokens`` above ``max_tokens``, ``tool_choice`` naming no listed tool, an
  invalid JSON Schema in ``tools`` or ``response_format``, a prompt past the context... ``check()`` finds those
  that need no tokenizer; the handlers the rest.

Top-level objects forbid unknown fields (a typo such as ``max_token`` silently ignored is worse than an error);
fields real SDKs send but this server has no use for are accepted and ignored (``IGNORED_FIELDS``). Nested objects
that clients echo back (messages, tool calls) ignore unknown keys, so a conversation round-trips whatever a client
library adds. Responses are in ``responses.py``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import jsonschema
from annotated_types import Ge, Interval
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
)

from mixtral.sampling import MAX_LOGIT_BIAS, MAX_LOGPROBS
from mixtral.serve.errors import APIError
from mixtral.serve.routing import RoutingRequestFields

# Largest seed both SDKs can send: an unsigned 64-bit value would not fit a signed tensor.
MAX_SEED = 2**63 - 1
MAX_N = 16
MAX_STOP_SEQUENCES = 16
MAX_TOP_LOGPROBS = MAX_LOGPROBS
MAX_LOGIT_BIAS_ENTRIES = 1024
# Prompts one text completion request may carry (OpenAI's batched form; lm-eval sends one list per request).
MAX_PROMPTS = 64

# Sent by the mistralai / openai SDKs; accepted and ignored (they carry no meaning for a self-hosted model).
IGNORED_FIELDS = ("metadata", "user", "store", "service_tier", "prompt_cache_key", "safety_identifier")


def _integral(value: Any) -> Any:
    """JSON Schema counts 5.0 as an integer; strict pydantic would not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def integer(ge: int | None = None, le: int | None = None) -> Any:
    """An integer field type: constraints first (so the schema says minimum/maximum), integral floats accepted."""
    return Annotated[int, Interval(ge=ge, le=le), BeforeValidator(_integral)]


TokenId = Annotated[int, Ge(0), BeforeValidator(_integral)]
NonEmptyStr = Annotated[str, Field(min_length=1)]


def _null_is(default: bool) -> Any:
    """A flag that clients serialising every field send as null: null means the default, in schema and code."""
    return AfterValidator(lambda value: default if value is None else value)


NullFalse = Annotated[bool | None, _null_is(False)]
# OpenAI's logit_bias: token ids as strings -> bias. pydantic would publish the key rule as patternProperties, which
# lets any other key through in the schema: propertyNames says what the validator checks.
LogitBias = Annotated[
    dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")],
         Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]],
    Field(max_length=MAX_LOGIT_BIAS_ENTRIES),
    WithJsonSchema({"type": "object", "maxProperties": MAX_LOGIT_BIAS_ENTRIES,
                    "propertyNames": {"pattern": "^[0-9]{1,9}$"},
                    "additionalProperties": {"type": "number", "minimum": -MAX_LOGIT_BIAS, "maximum": MAX_LOGIT_BIAS}}),
]
NullTrue = Annotated[bool | None, _null_is(True)]

# Values of a feature this server does not implement that mean "off": null, false, empty ones, and per field a few
# more. The schema admits exactly these (so generated requests and the validator agree).
_OFF_EXTRA: dict[str, list[Any]] = {
    "reasoning_effort": ["none"], "function_call": ["none", "auto"], "modalities": [["text"]], "best_of": [1],
    "top_prompt_logprobs": [0],
}
_OFF_SCHEMA = [{"type": "null"}, {"const": False}, {"type": "string", "maxLength": 0},
               {"type": "array", "maxItems": 0}, {"type": "object", "maxProperties": 0}]


def _is_off(name: str, value: Any) -> bool:
    if value is None or value is False or (isinstance(value, (dict, list, str)) and not value):
        return True
    for off in _OFF_EXTRA.get(name, ()):
        same_kind = isinstance(value, bool) == isinstance(off, bool) and isinstance(value, (int, float)) == \
            isinstance(off, (int, float))
        if same_kind and value == off:
            return True
    return False


def _unsupported(name: str) -> Any:
    def check(value: Any) -> Any:
        if not _is_off(name, value):
            raise ValueError(f"'{name}' is not supported by this server (got {value!r:.100}); leave it unset")
        return value

    schema = {"anyOf": [*_OFF_SCHEMA, *({"const": v} for v in _OFF_EXTRA.get(name, ()))],
              "description": "not supported: only its 'off' values are accepted"}
    return Annotated[Any, WithJsonSchema(schema), AfterValidator(check)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


def bad_request(message: str, param: str, code: str = "invalid_request") -> APIError:
    """A 400 for a well-formed request that cannot be served as asked."""
    return APIError(400, message, param=param, code=code)


def check_json_schema(schema: Any, where: str) -> None:
    """400 naming ``where`` when ``schema`` is not a valid JSON Schema."""
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as exc:
        at = "/".join(str(p) for p in exc.path) or "(root)"
        raise bad_request(f"{where} is not a valid JSON Schema (at {at}): {exc.message}", where,
                          "invalid_schema") from None
    except (RecursionError, TypeError, ValueError) as exc:  # self-referencing or non-JSON values
        raise bad_request(f"{where} is not a valid JSON Schema: {type(exc).__name__}", where, "invalid_schema") \
            from None


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
    # Mistral: the last message is a prefix the model continues (ignored on earlier messages).
    prefix: NullFalse = False


class ToolMessage(_Lenient):
    role: Literal["tool"]
    content: Content
    tool_call_id: str = Field(min_length=1)  # the call it answers: the v3 format pairs them by id
    name: str | None = None


ChatMessage = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


# --------------------------------------------------------------------------- tools and formats
class FunctionDefinition(_Lenient):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


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

    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)


class TextFormat(_Lenient):
    type: Literal["text"]


class JsonObjectFormat(_Lenient):
    type: Literal["json_object"]


class JsonSchemaResponseFormat(_Lenient):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaResponseFormat, Field(discriminator="type")]


class StreamOptions(_Lenient):
    include_usage: bool | None = None


class StructuredOutputs(_Lenient):
    """vLLM's ``structured_outputs``: one of a JSON schema, a regular expression, a list of choices or a grammar
    (llguidance's Lark dialect)."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[NonEmptyStr] | None = Field(default=None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None

    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)


# --------------------------------------------------------------------------- requests
class _SamplingFields(_Strict, RoutingRequestFields):
    """Fields shared by chat and text completions (Mistral names first, OpenAI and vLLM ones beside them)."""

    model: str = Field(min_length=1, max_length=256)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: integer(-1, 1_000_000) | None = None
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    max_tokens: integer(1) | None = None
    max_completion_tokens: integer(1) | None = None
    min_tokens: integer(0) | None = None
    stream: NullFalse = False
    stream_options: StreamOptions | None = None
    stop: NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    stop_token_ids: list[TokenId] | None = Field(default=None, max_length=64)
    random_seed: integer(0, MAX_SEED) | None = None
    seed: integer(0, MAX_SEED) | None = None
    n: integer(1, MAX_N) | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    ignore_eos: NullFalse = False
    skip_special_tokens: NullTrue = True
    logit_bias: LogitBias | None = None
    prompt_logprobs: integer(0, MAX_LOGPROBS) | None = None
    # Constrained output, vLLM's names (older guided_* and newer structured_outputs).
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[NonEmptyStr] | None = Field(default=None, min_length=1)
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # accepted and ignored: llguidance is the one backend
    structured_outputs: StructuredOutputs | None = None
    # Fields real SDKs send that carry no meaning here (see IGNORED_FIELDS).
    metadata: dict[str, Any] | None = None
    user: str | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # Features not implemented: only their "off" values are accepted.
    prediction: _unsupported("prediction") = None
    prompt_mode: _unsupported("prompt_mode") = None
    reasoning_effort: _unsupported("reasoning_effort") = None
    guardrails: _unsupported("guardrails") = None
    modalities: _unsupported("modalities") = None
    audio: _unsupported("audio") = None
    web_search_options: _unsupported("web_search_options") = None
    functions: _unsupported("functions") = None
    function_call: _unsupported("function_call") = None
    verbosity: _unsupported("verbosity") = None
    top_prompt_logprobs: _unsupported("top_prompt_logprobs") = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        return [value] if isinstance(value, str) else value

    @property
    def effective_seed(self) -> int | None:
        return self.random_seed if self.random_seed is not None else self.seed

    @property
    def effective_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def structured(self) -> tuple[str, Any] | None:
        """The one output constraint of vLLM's extras, as (kind, value): kind is json / regex / choice / grammar
        / json_object; None without one. 400 when several are given."""
        found: list[tuple[str, str, Any]] = []
        for param, kind, value in (("guided_json", "json", self.guided_json),
                                   ("guided_regex", "regex", self.guided_regex),
                                   ("guided_choice", "choice", self.guided_choice),
                                   ("guided_grammar", "grammar", self.guided_grammar)):
            if value is not None:
                found.append((param, kind, value))
        so = self.structured_outputs
        if so is not None:
            for kind, value in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                                ("grammar", so.grammar), ("json_object", so.json_object or None)):
                if value is not None:
                    found.append((f"structured_outputs.{kind}", kind, value))
        if len(found) > 1:
            raise bad_request(f"give one output constraint, got {[p for p, _, _ in found]}", found[1][0])
        return (found[0][1], found[0][2]) if found else None

    def check(self) -> None:
        """400 for combinations no schema can express (fields valid alone, contradictory together)."""
        if self.seed is not None and self.random_seed is not None and self.seed != self.random_seed:
            raise bad_request(f"'seed' ({self.seed}) and 'random_seed' ({self.random_seed}) disagree; send one",
                              "seed")
        max_tokens = self.effective_max_tokens
        if self.min_tokens and max_tokens is not None and self.min_tokens > max_tokens:
            raise bad_request(f"min_tokens ({self.min_tokens}) exceeds max_tokens ({max_tokens})", "min_tokens")
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise bad_request(f"'max_tokens' ({self.max_tokens}) and 'max_completion_tokens' "
                              f"({self.max_completion_tokens}) disagree; send one", "max_tokens")
        structured = self.structured()
        if structured is not None and structured[0] == "json" and isinstance(structured[1], dict):
            check_json_schema(structured[1], "guided_json" if self.guided_json is not None else
                              "structured_outputs.json")


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: NullTrue = True
    response_format: ResponseFormat | None = None
    safe_prompt: NullFalse = False
    logprobs: NullFalse = False
    top_logprobs: integer(0, MAX_TOP_LOGPROBS) | None = None
    # vLLM's chat-template switches: continue the last (assistant) message instead of opening a new reply.
    continue_final_message: NullFalse = False
    add_generation_prompt: NullTrue = True

    @property
    def tool_choice_or_default(self) -> str | NamedToolChoice:
        return self.tool_choice if self.tool_choice is not None else "auto"

    @property
    def continues_last_message(self) -> bool:
        """The reply continues the last message (a Mistral ``prefix`` or vLLM's switches) instead of opening one."""
        last = self.messages[-1]
        return isinstance(last, AssistantMessage) and (
            last.prefix or bool(self.continue_final_message) or not self.add_generation_prompt)

    def check(self) -> None:
        super().check()
        names = [t.function.name for t in self.tools or []]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise bad_request(f"tools: function names must be unique, {dupes} appear more than once", "tools")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise bad_request(f"tool_choice names function {choice.function.name!r}, which is not in tools {names}",
                              "tool_choice")
        if choice in ("any", "required") and not names:
            raise bad_request(f"tool_choice={choice!r} needs a non-empty 'tools' list", "tool_choice")
        if self.top_logprobs and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
        for i, tool in enumerate(self.tools or []):
            check_json_schema(tool.function.parameters, f"tools[{i}].function.parameters")
        fmt = self.response_format
        if isinstance(fmt, JsonSchemaResponseFormat):
            check_json_schema(fmt.json_schema.schema_, "response_format.json_schema.schema")
        if fmt is not None and not isinstance(fmt, TextFormat) and self.structured() is not None:
            raise bad_request("give one output constraint: response_format or vLLM's guided_* / structured_outputs, "
                              "not both", "response_format")
        if self.continue_final_message and self.add_generation_prompt is not False and \
                "add_generation_prompt" in self.model_fields_set:
            raise bad_request("continue_final_message=true continues the last message, so it cannot also open a new "
                              "reply; set add_generation_prompt=false (or leave it out)", "continue_final_message")
        last_is_assistant = isinstance(self.messages[-1], AssistantMessage)
        if (self.continue_final_message or not self.add_generation_prompt) and not last_is_assistant:
            which = "continue_final_message=true" if self.continue_final_message else "add_generation_prompt=false"
            raise bad_request(f"{which} needs the last message to be an assistant message to continue (Mistral's "
                              f"chat format always opens the reply after a {self.messages[-1].role} message)",
                              "continue_final_message" if self.continue_final_message else "add_generation_prompt")


# A text completion prompt: text, token ids, or a batch of either.
TextPrompt = Annotated[str, Field(min_length=1)]
IdsPrompt = Annotated[list[TokenId], Field(min_length=1)]
Prompt = TextPrompt | IdsPrompt | Annotated[list[TextPrompt], Field(min_length=1, max_length=MAX_PROMPTS)] | \
    Annotated[list[IdsPrompt], Field(min_length=1, max_length=MAX_PROMPTS)]


class CompletionRequest(_SamplingFields):
    """POST /v1/completions: a plain prompt (or a batch of them), no chat template.

    ``max_tokens: 0`` scores the prompt without generating (with ``echo`` and ``logprobs``, as lm-eval does)."""

    prompt: Prompt
    max_tokens: integer(0) | None = None
    echo: NullFalse = False
    logprobs: integer(0, MAX_TOP_LOGPROBS) | None = None
    suffix: _unsupported("suffix") = None
    best_of: _unsupported("best_of") = None

    @property
    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts, one per engine request (a single prompt is a batch of one)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and isinstance(prompt[0], int):
            return [prompt]  # type: ignore[list-item]  # one prompt of token ids
        return prompt  # type: ignore[return-value]

    @field_validator("prompt", mode="before")
    @classmethod
    def _integral_ids(cls, value: Any) -> Any:
        # Strict unions try each branch; normalise integral floats inside id lists first.
        if isinstance(value, list):
            return [[_integral(v) for v in x] if isinstance(x, list) else _integral(x) for x in value]
        return value


# --------------------------------------------------------------------------- tokenizer endpoints (vLLM's)
class TokenizeCompletionRequest(_Strict):
    """POST /tokenize with text: its ids (``add_special_tokens`` puts ``<s>`` first). Control-token text
    (``<s>``, ``</s>``, ``[INST]``...) maps to the control token, as Hugging Face tokenizers do."""

    model: str | None = None
    prompt: str
    add_special_tokens: NullTrue = True
    return_token_strs: NullFalse = False


class TokenizeChatRequest(_Strict):
    """POST /tokenize with messages: the prompt ids a chat completion would run on."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    add_generation_prompt: NullTrue = True
    continue_final_message: NullFalse = False
    add_special_tokens: NullFalse = False  # accepted for vLLM's shape: the chat format always starts with <s>
    return_token_strs: NullFalse = False


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[TokenId]

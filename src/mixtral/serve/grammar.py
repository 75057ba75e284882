"""Request -> llguidance grammar: tool_choice and response_format as a Lark grammar over the Mistral vocabulary.

Output shapes the grammars allow (``<[5]>`` is the ``[TOOL_CALLS]`` control token of the v3 vocabulary):

- tool call (``any`` / ``required`` / named): ``[TOOL_CALLS] [{"name": "f", "arguments": {...}}, ...]`` then EOS;
  each call may end with ``, "id": "<9 alphanumerics>"`` as in the v3 prompts.
  The frame uses the separators ``json.dumps`` writes, as in the prompts mistral-common encodes (what the model
  was trained on); each tool's ``arguments`` is an inline ``%json`` schema with the same compact separators.
- ``auto``: free text (which can never contain a control token) or a tool call as above.
- ``none``: handled without a grammar (one banned token, see ``guided.BanTokensGuide``) unless JSON is asked for.
- ``json_object`` / ``json_schema``: one JSON value valid against the schema, in the same compact style (the
  separators ``json.dumps`` writes, no other whitespace): the model's own style, and no run of newlines to loop on.
- ``strict: true`` on a function or a ``json_schema``: objects that do not state ``additionalProperties`` take
  no keys beyond their ``properties``, as OpenAI's strict mode means (JSON Schema's default would allow any).

Everything is validated here so a bad request fails with ``GuideError`` naming the bad field, not deep in
the engine.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import jsonschema

from mixtral.serve.limits import value_depth

# Tool names as the Mistral API accepts them; this also keeps them safe inside Lark string literals.
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

# Compact JSON, exactly what json.dumps writes: ", " between items and ": " after keys, no other whitespace.
_COMPACT_JSON = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


# Bounds on each schema of a request (tool parameters, response_format), checked before anything recursive or
# costly looks at it: ``jsonschema`` recurses several frames per level and takes ~2.5 s per MB.
DEFAULT_MAX_SCHEMA_BYTES = 512 * 1024  # as compact JSON
DEFAULT_MAX_SCHEMA_DEPTH = 64  # JSON nesting: {"properties": {"a": {...}}} is two levels per schema level


class GuideError(ValueError):
    """A request asks for constrained output that cannot be built: the message names the bad field and value."""


@dataclass(frozen=True)
class SchemaLimits:
    max_bytes: int = DEFAULT_MAX_SCHEMA_BYTES
    max_depth: int = DEFAULT_MAX_SCHEMA_DEPTH

    def __post_init__(self) -> None:
        if self.max_bytes < 2 or self.max_depth < 1:
            raise ValueError(f"schema limits must be positive, got {self}")


@dataclass(frozen=True)
class ToolSpec:
    name: str
    schema: dict[str, Any]  # JSON schema of the arguments object


@dataclass(frozen=True)
class GuidePlan:
    """What to constrain, after validating the request.

    mode: "free" (no tool constraint), "none" (the [TOOL_CALLS] token is banned), "auto" (text/JSON or a call),
    "required" (a call is forced). ``tools`` are the callable tools (just the named one for a named choice).
    ``json_schema`` is the schema free output must follow (None: free text).
    """

    mode: str
    tools: tuple[ToolSpec, ...]
    json_schema: dict[str, Any] | None
    parallel_tool_calls: bool


def _schema_problem(schema: dict[str, Any] | bool) -> tuple[str, str] | None:
    """(path, message) of the first metaschema violation of a schema, or None. Not cached: the compiled grammar
    is (``guide_compiler``), and a cache keyed by client input would have to be bounded too."""
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        return "".join(f"[{p!r}]" for p in e.path), e.message
    return None


def _check_schema(schema: Any, where: str, limits: SchemaLimits) -> dict[str, Any] | bool:
    if not isinstance(schema, (dict, bool)):
        raise GuideError(f"{where} must be a JSON schema object, got {type(schema).__name__}: {schema!r:.200}")
    depth = value_depth(schema)
    if depth > limits.max_depth:
        raise GuideError(f"{where} nests {depth} levels deep; the limit is {limits.max_depth} levels of JSON "
                         f"objects and arrays")
    try:
        size = len(json.dumps(schema, separators=(",", ":"), allow_nan=False).encode())
    except (TypeError, ValueError) as e:
        raise GuideError(f"{where} is not plain JSON: {e}") from None
    if size > limits.max_bytes:
        raise GuideError(f"{where} is {size} bytes as compact JSON; the limit is {limits.max_bytes} bytes "
                         f"(--max-guided-schema-bytes)")
    problem = _schema_problem(schema)
    if problem is not None:
        raise GuideError(f"{where}{problem[0]} is not a valid JSON schema: {problem[1]}")
    return schema


# Keywords whose values are schemas, one or a list or a map of them, that ``strict`` closes too. ``allOf`` is left
# alone: its branches often split one object's properties, and closing each would make them contradict.
_SUBSCHEMA_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains")
_SUBSCHEMA_LIST = ("anyOf", "oneOf", "prefixItems")
_SUBSCHEMA_MAP = ("properties", "$defs", "definitions", "patternProperties")


def _strict(schema: Any) -> Any:
    """``strict: true`` as OpenAI's structured outputs mean it: every object schema that does not say otherwise
    takes no keys beyond its ``properties`` (JSON Schema's own default allows any). An object that states
    ``additionalProperties`` or ``patternProperties`` keeps what it states. Returns a new schema."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA_ONE:
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    for key in _SUBSCHEMA_LIST:
        if isinstance(out.get(key), list):
            out[key] = [_strict(s) for s in out[key]]
    for key in _SUBSCHEMA_MAP:
        if isinstance(out.get(key), dict):
            out[key] = {k: _strict(v) for k, v in out[key].items()}
    kind = out.get("type")
    is_object = kind == "object" or (isinstance(kind, list) and "object" in kind) or "properties" in out
    if is_object and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def _tool_specs(tools: list[dict[str, Any]], limits: SchemaLimits) -> list[ToolSpec]:
    if not isinstance(tools, list):
        raise GuideError(f"tools must be a list, got {type(tools).__name__}")
    specs: list[ToolSpec] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise GuideError(f"tools[{i}] must be an object, got {type(tool).__name__}")
        if tool.get("type", "function") != "function":
            raise GuideError(f"tools[{i}].type must be 'function', got {tool.get('type')!r}")
        fn = tool.get("function", tool)  # {"type": "function", "function": {...}} or the bare function
        where = f"tools[{i}].function" if "function" in tool else f"tools[{i}]"
        if not isinstance(fn, dict):
            raise GuideError(f"{where} must be an object, got {type(fn).__name__}")
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise GuideError(f"{where}.name must match [a-zA-Z0-9_-]{{1,64}}, got {name!r}")
        if name in seen:
            raise GuideError(f"{where}.name {name!r} is defined twice")
        seen.add(name)
        params = fn.get("parameters")
        if params is None:  # a function without parameters takes exactly {}
            params = {"type": "object", "properties": {}, "additionalProperties": False}
        _check_schema(params, f"{where}.parameters", limits)
        if params is True or params == {}:
            params = {"type": "object"}
        elif params is False:
            raise GuideError(f"{where}.parameters is `false`: no arguments object could ever be valid")
        elif "type" not in params:
            params = {**params, "type": "object"}
        elif params["type"] != "object":
            raise GuideError(f"{where}.parameters must describe an object (type 'object'), got type {params['type']!r}")
        if fn.get("strict") is True:
            params = _strict(params)
        specs.append(ToolSpec(name, params))
    return specs


def _choice(tool_choice: Any) -> tuple[str, str | None]:
    """-> (mode, forced tool name). Accepts Mistral and OpenAI spellings."""
    if tool_choice is None:
        return "auto", None
    if isinstance(tool_choice, str):
        if tool_choice in ("auto", "none"):
            return tool_choice, None
        if tool_choice in ("any", "required"):
            return "required", None
        raise GuideError(f"tool_choice must be 'auto', 'none', 'any', 'required' or a named tool, got {tool_choice!r}")
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type", "function") == "function" and isinstance(name, str):
            return "required", name
    raise GuideError(
        'tool_choice must be a string or {"type": "function", "function": {"name": ...}}, got '
        f"{tool_choice!r:.200}"
    )


def _response_schema(response_format: dict[str, Any] | None, limits: SchemaLimits) -> dict[str, Any] | bool | None:
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise GuideError(f"response_format must be an object, got {type(response_format).__name__}")
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise GuideError("response_format.json_schema must be an object with a 'schema' field")
        if "schema" not in spec:
            raise GuideError("response_format.json_schema.schema is required")
        schema = _check_schema(spec["schema"], "response_format.json_schema.schema", limits)
        if schema is False:
            raise GuideError("response_format.json_schema.schema is `false`: no output could ever be valid")
        return _strict(schema) if spec.get("strict") is True else schema
    raise GuideError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def plan_guide(
    *,
    version: str,
    has_tool_calls_token: bool,
    tools: list[dict[str, Any]] | None,
    tool_choice: Any,
    response_format: dict[str, Any] | None,
    parallel_tool_calls: bool,
    limits: SchemaLimits | None = None,
) -> GuidePlan:
    """Validate a request's tool and format fields and decide what to constrain."""
    limits = limits or SchemaLimits()
    mode, forced = _choice(tool_choice)
    specs = _tool_specs(tools, limits) if tools else []
    schema = _response_schema(response_format, limits)
    json_schema = {} if schema is True else schema  # `true` schema: any JSON value

    if not specs:
        if mode == "required":
            what = f"names the tool {forced!r}" if forced else f"is {tool_choice!r}"
            raise GuideError(f"tool_choice {what} but the request has no tools")
        mode = "free"  # nothing callable: auto and none mean the same
    elif mode != "none" and not has_tool_calls_token:
        raise GuideError(
            f"this model's tokenizer ({version}) has no [TOOL_CALLS] token, so it cannot call tools; "
            "send the request without tools (or with tool_choice 'none')"
        )
    elif not has_tool_calls_token:
        mode = "free"  # tool_choice none on a vocabulary without the token: nothing to ban

    if forced is not None:
        chosen = [s for s in specs if s.name == forced]
        if not chosen:
            raise GuideError(f"tool_choice names the tool {forced!r}, which is not in tools {[s.name for s in specs]}")
        specs = chosen
    return GuidePlan(mode, tuple(specs) if mode in ("auto", "required") else (), json_schema, parallel_tool_calls)


def _lark_str(text: str) -> str:
    """A Lark string literal matching ``text`` exactly (JSON string escapes are valid Lark escapes)."""
    return json.dumps(text)


def _json_rule(schema: dict[str, Any], options: dict[str, Any]) -> str:
    """``%json {...}`` with compile options; options already in the schema's own x-guidance win."""
    own = schema.get("x-guidance") if isinstance(schema, dict) else None
    merged = {**options, **own} if isinstance(own, dict) else options
    return "%json " + json.dumps({**schema, "x-guidance": merged})


def lark_grammar(plan: GuidePlan, tool_calls_id: int | None) -> str:
    """The Lark grammar (llguidance dialect) of a plan that constrains something beyond one banned token."""
    lines: list[str] = []
    calls = plan.mode in ("auto", "required")
    if plan.mode != "required":  # the free answer: JSON when asked for, else any text
        if plan.json_schema is not None:
            # A SentencePiece model's answer naturally starts with a "▁"-prefixed piece (" {"): allow one space.
            lines.append(f'answer: " "? {_json_rule(plan.json_schema, _COMPACT_JSON)}')
        else:
            lines.append("answer: TEXT")
            lines.append(r"TEXT: /(?s:.*)/")  # any text; control tokens never match a regex
    if calls:
        # One rule per tool: the name is fixed before the arguments, whose schema depends on it.
        call_rules = []
        for k, spec in enumerate(plan.tools):
            head = _lark_str(f'{{"name": "{spec.name}", "arguments": ')
            lines.append(f"call_{k}: {head} args_{k} call_id? " + _lark_str("}"))
            lines.append(f"args_{k}: {_json_rule(spec.schema, _COMPACT_JSON)}")
            call_rules.append(f"call_{k}")
        lines.append("call: " + " | ".join(call_rules))
        # v3 prompts carry each past call's 9-character id after its arguments (mistral-common writes them), so a
        # model may write one too: allow it, in that exact form. The server issues its own ids either way.
        lines.append("call_id: " + _lark_str(', "id": "') + " CALL_ID " + _lark_str('"'))
        lines.append("CALL_ID: /[a-zA-Z0-9]{9}/")
        more = ' ("," " " call)*' if plan.parallel_tool_calls else ""
        lines.append(f'tool_calls: <[{tool_calls_id}]> " "? "[" call{more} "]"')
    start = {"required": "tool_calls", "auto": "answer | tool_calls"}.get(plan.mode, "answer")
    return "\n".join([f"start: {start}", *lines]) + "\n"

"""vLLM's constrained-output extras -> a TokenGuide: ``guided_json`` / ``guided_regex`` / ``guided_choice`` /
``guided_grammar`` and ``structured_outputs: {json | regex | choice | grammar | json_object}``.

JSON goes through the same path as ``response_format`` (``guided.build_guide``, compact JSON in the model's own
style); a regex, a list of choices and a grammar become a Lark grammar for llguidance (``guided.build_lark_guide``:
the same compile cache and limits). A chat reply may open with SentencePiece's word-start space (``▁Paris``), which
the reply text drops: chat grammars allow that one space; a text completion gets exactly what it asked for.
Not here: the tool-call grammars (``grammar.py``) and the checks of the request's shape (``protocol.py``).
"""

from __future__ import annotations

import json
from typing import Any

from mixtral.guide import TokenGuide
from mixtral.serve.errors import APIError


def _lark_regex(pattern: str) -> str:
    """``pattern`` as a Lark ``/.../`` literal: unescaped slashes and raw line breaks escaped."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            out.append(pattern[i:i + 2])
            i += 2
            continue
        out.append({"/": "\\/", "\n": "\\n", "\r": "\\r"}.get(ch, ch))
        i += 1
    return "/" + "".join(out) + "/"


def lark_for(kind: str, value: Any, *, leading_space: bool) -> str:
    """The Lark grammar of a regex / choice / grammar constraint."""
    space = '" "? ' if leading_space else ""
    if kind == "regex":
        return f"start: {space}{_lark_regex(value)}\n"
    if kind == "choice":
        return f"start: {space}(" + " | ".join(json.dumps(c) for c in value) + ")\n"
    if kind == "grammar":
        return value if value.endswith("\n") else value + "\n"
    raise ValueError(f"no Lark grammar for constraint kind {kind!r}")


def structured_guide(tokenizer: Any, structured: tuple[str, Any] | None, *, chat: bool) -> TokenGuide | None:
    """The guide for ``request.structured()`` (None: no constraint). 400 naming the field when it cannot be built.
    Compiling can take milliseconds: call it off the event loop."""
    if structured is None:
        return None
    from mixtral.serve.guided import GuideError, build_guide, build_lark_guide

    kind, value = structured
    try:
        if kind in ("json", "json_object"):
            if kind == "json_object":
                fmt: dict[str, Any] = {"type": "json_object"}
            else:
                schema = value
                if isinstance(value, str):
                    try:
                        schema = json.loads(value)
                    except json.JSONDecodeError as exc:
                        raise APIError(400, f"guided_json is a string that is not JSON: {exc}",
                                       param="guided_json", code="invalid_schema") from None
                fmt = {"type": "json_schema", "json_schema": {"schema": schema}}
            return build_guide(tokenizer, response_format=fmt)
        return build_lark_guide(tokenizer, lark_for(kind, value, leading_space=chat))
    except GuideError as exc:
        param = {"json": "guided_json", "regex": "guided_regex", "choice": "guided_choice"}.get(kind, "guided_grammar")
        raise APIError(400, str(exc), param=param, code="invalid_guide") from exc

"""Per-token expert routing in API responses: the request fields, the response objects, and their assembly.

Opt-in request fields on ``/v1/chat/completions`` and ``/v1/completions`` (``RoutingRequestFields``, mixed into
the request models of ``protocol.py``): ``return_routing`` returns the routing of the generated tokens,
``return_prompt_routing`` also (or only that: it implies ``return_routing``) the routing of the prompt tokens.
Off by default, and then nothing here runs and nothing is added to a response.

Wire shape (``ChoiceRouting``; one per choice)::

    "routing": {"num_layers": L, "top_k": k,
                "tokens": [{"token_id": 415, "token": " Paris",
                            "experts": [[3, 7], [0, 5], ...],        # L lists of k expert ids, best first
                            "weights": [[0.62, 0.38], [0.51, 0.49], ...]}, ...],
                "prompt_tokens": [...same entries...] | null}

In a stream each chunk's choice carries ``"routing": {"tokens": [...the tokens of this delta...]}`` and the first
routing chunk of a choice also ``prompt_tokens`` when asked (``DeltaRouting``); ``RoutingStream`` keeps count.

The handlers (chat.py, completions.py) pass the fields to the engine with ``routing_params`` and build the
objects with ``RoutingBuilder``. What the engine hands over (the hook; see ``ENGINE_HOOK``; engine/routing.py
captures it, engine/outputs.py documents it): for each sample (``CompletionOutput``), cumulative like
``token_ids``, ``routing_experts`` int [T, L, k] and ``routing_weights`` float [T, L, k], row i belonging to
``token_ids[i]``; for the request (``RequestOutput``), ``prompt_routing_experts`` / ``prompt_routing_weights``
[P, L, k] aligned with ``prompt_token_ids``. Any array-like (numpy, torch on the CPU, nested lists) works.
Which step's routing a row holds: prompt row j is the routing at prompt position j (the pass that processed
prompt token j); generated row i is the routing of the pass whose logits sampled token i (the position before it,
so generated row 0 is the last prompt position's routing). Every token then has a row as soon as it exists, which
is what a stream needs; the routing of the pass that processed generated token i is row i + 1.

Weights are sent rounded to 4 decimals (they are router probabilities renormalised over the k chosen experts).
This module knows nothing about the engine beyond ``SamplingParams``; it does not capture routing (the model runner
does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mixtral.sampling import SamplingParams

# Names of the attributes the engine's outputs carry (see the module docstring).
ENGINE_HOOK = {
    "sample": ("routing_experts", "routing_weights"),  # on CompletionOutput: [T, L, k], cumulative
    "prompt": ("prompt_routing_experts", "prompt_routing_weights"),  # on RequestOutput: [P, L, k]
}
WEIGHT_DECIMALS = 4


class RoutingRequestFields(BaseModel):
    """The two request fields (a mixin of the chat and text completion requests)."""

    model_config = ConfigDict(extra="forbid")

    return_routing: bool = Field(
        default=False,
        description="Return, for each generated token, every MoE layer's chosen experts and their weights "
                    "(`routing` in each choice; in streams, the tokens of each delta).")
    return_prompt_routing: bool = Field(
        default=False,
        description="Also return the routing of every prompt token (`routing.prompt_tokens`); implies "
                    "`return_routing`.")

    @field_validator("return_routing", "return_prompt_routing", mode="before")
    @classmethod
    def _routing_null_is_false(cls, value: Any) -> Any:
        # Clients that serialise every field send null for "not set". (A name of its own: the request models
        # define validators called _null_is_false, which would replace this one.)
        return False if value is None else value

    @property
    def routing_wanted(self) -> bool:
        return self.return_routing or self.return_prompt_routing


def routing_params(req: RoutingRequestFields, params: SamplingParams) -> SamplingParams:
    """``params`` asking the engine for the routing ``req`` wants (the same object when it wants none). The engine
    then returns generated-token routing whenever any is asked (``return_prompt_routing`` implies it here)."""
    if not req.routing_wanted:
        return params
    return dataclasses.replace(params, return_routing=True, return_prompt_routing=req.return_prompt_routing)


# --------------------------------------------------------------------------- response objects (OpenAPI schema)
class TokenRouting(BaseModel):
    """One token and, for every MoE layer, its chosen experts (best first) and their weights."""

    token_id: int
    token: str = Field(description="the token's text piece (as in logprobs)")
    experts: list[list[int]] = Field(description="[num_layers][top_k] expert ids, best first")
    weights: list[list[float]] = Field(description="[num_layers][top_k] routing weights (each list sums to 1)")


class ChoiceRouting(BaseModel):
    """The routing of one choice (non-streaming responses)."""

    num_layers: int
    top_k: int
    tokens: list[TokenRouting] = Field(description="one entry per generated token")
    prompt_tokens: list[TokenRouting] | None = Field(
        default=None, description="one entry per prompt token; null unless return_prompt_routing")


class DeltaRouting(BaseModel):
    """The routing carried by one streamed chunk of a choice."""

    tokens: list[TokenRouting] = Field(description="the tokens of this delta")
    prompt_tokens: list[TokenRouting] | None = Field(
        default=None, description="every prompt token; only in a choice's first routing chunk, when asked")


# --------------------------------------------------------------------------- assembly
def _as_array(values: Any, dtype: type, what: str) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()
    arr = np.asarray(values, dtype=dtype)
    if arr.ndim != 3:
        raise ValueError(f"{what} must be [tokens, layers, top_k], got shape {arr.shape}")
    return arr


def token_routing(token_ids: Sequence[int], experts: Any, weights: Any, piece_texts: Sequence[str], *,
                  num_layers: int, top_k: int, num_experts: int) -> list[dict[str, Any]]:
    """Per-token wire entries from ``experts`` int [T, L, k] and ``weights`` float [T, L, k].

    Raises ValueError naming the shape or value when the arrays do not fit the tokens and the model (an engine
    bug: the handler turns it into a 500 rather than sending wrong routing).
    """
    if len(token_ids) == 0:  # (the engine's arrays have no shape to check before their first row)
        return []
    ids = _as_array(experts, np.int64, "routing experts")  # [T, L, k]
    w = _as_array(weights, np.float64, "routing weights")  # [T, L, k]
    expected = (len(token_ids), num_layers, top_k)
    if ids.shape != expected or w.shape != expected:
        raise ValueError(f"routing arrays must be [tokens, layers, top_k] = {list(expected)}, got experts "
                         f"{list(ids.shape)} and weights {list(w.shape)}")
    if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
        bad = int(ids[(ids < 0) | (ids >= num_experts)][0])
        raise ValueError(f"routing holds expert id {bad}, outside 0..{num_experts - 1}")
    w = np.round(w, WEIGHT_DECIMALS)
    expert_rows = ids.tolist()
    weight_rows = w.tolist()
    return [{"token_id": int(t), "token": piece_texts[int(t)], "experts": e, "weights": ww}
            for t, e, ww in zip(token_ids, expert_rows, weight_rows, strict=True)]


class RoutingBuilder:
    """Builds routing objects from engine outputs for one request (model shape and tokenizer bound once)."""

    def __init__(self, piece_texts: Sequence[str], *, num_layers: int, top_k: int, num_experts: int,
                 include_prompt: bool) -> None:
        self.piece_texts = piece_texts
        self.num_layers = num_layers
        self.top_k = top_k
        self.num_experts = num_experts
        self.include_prompt = include_prompt

    @classmethod
    def for_request(cls, req: RoutingRequestFields, tokenizer: Any, model_args: Any) -> RoutingBuilder | None:
        """A builder when the request asks for routing, else None (and then routing costs nothing)."""
        if not req.routing_wanted:
            return None
        return cls(tokenizer.piece_texts, num_layers=model_args.n_layers, top_k=model_args.num_experts_per_tok,
                   num_experts=model_args.num_experts, include_prompt=req.return_prompt_routing)

    def _entries(self, token_ids: Sequence[int], owner: Any, names: tuple[str, str], what: str,
                 start: int = 0) -> list[dict[str, Any]]:
        experts, weights = (getattr(owner, name, None) for name in names)
        if experts is None or weights is None:
            raise ValueError(f"routing was requested but the engine output carries no {what} routing "
                             f"({type(owner).__name__}.{names[0]} / .{names[1]} are unset)")
        return token_routing(token_ids[start:], experts[start:], weights[start:], self.piece_texts,
                             num_layers=self.num_layers, top_k=self.top_k, num_experts=self.num_experts)

    def prompt_entries(self, request_output: Any) -> list[dict[str, Any]] | None:
        if not self.include_prompt:
            return None
        return self._entries(request_output.prompt_token_ids, request_output, ENGINE_HOOK["prompt"], "prompt")

    def sample_entries(self, sample: Any, start: int = 0) -> list[dict[str, Any]]:
        """Entries of ``sample``'s generated tokens from index ``start`` on."""
        return self._entries(sample.token_ids, sample, ENGINE_HOOK["sample"], "generated-token", start)

    def choice(self, request_output: Any, sample: Any) -> dict[str, Any]:
        """The ``routing`` object of one choice of a finished (non-streaming) request."""
        return {"num_layers": self.num_layers, "top_k": self.top_k, "tokens": self.sample_entries(sample),
                "prompt_tokens": self.prompt_entries(request_output)}

    def stream(self, n: int) -> RoutingStream:
        return RoutingStream(self, n)


class RoutingStream:
    """Per-choice cursors of a streamed request: each call returns the routing of the tokens not sent yet."""

    def __init__(self, builder: RoutingBuilder, n: int) -> None:
        self.builder = builder
        self.sent = [0] * n
        self.prompt_sent = [False] * n

    def delta(self, request_output: Any, sample: Any) -> dict[str, Any] | None:
        """``{"tokens": [...]}`` (+ ``prompt_tokens`` the first time, when asked) for the tokens of ``sample``
        not sent yet; None when there is nothing new. Call it when emitting that choice's delta."""
        i = sample.index
        tokens = self.builder.sample_entries(sample, self.sent[i]) if len(sample.token_ids) > self.sent[i] else []
        out: dict[str, Any] = {"tokens": tokens}
        if not self.prompt_sent[i] and self.builder.include_prompt:
            out["prompt_tokens"] = self.builder.prompt_entries(request_output)
            self.prompt_sent[i] = True
        self.sent[i] = len(sample.token_ids)
        if not tokens and "prompt_tokens" not in out:
            return None
        return out

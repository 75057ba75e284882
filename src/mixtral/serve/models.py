"""Which model names the server answers to, and the Mistral model card it lists for them.

The served name (``--served-model-name``, else the model argument) is the card's id. A model with the shape of
Mixtral-8x7B or 8x22B also answers to Mistral's hosted names (``open-mixtral-8x7b`` / ``open-mixtral-8x22b``), so
code written against the hosted API (``MistralClient(...).chat(model="open-mixtral-8x22b", ...)``) runs
unchanged. Any other name is a 404 listing the names that work. ``/v1/models`` lists every name it answers to as
a model of its own (OpenAI and vLLM clients look a model up by id in that list); an alias's card says which model
it is in ``root``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from mixtral.model.args import ModelArgs
from mixtral.sampling import DEFAULT_TEMPERATURE
from mixtral.serve.errors import APIError
from mixtral.serve.responses import ModelCapabilities, ModelCard, ModelList

# (dim, n_layers, num_experts) -> Mistral's hosted name for that shape.
_HOSTED_ALIASES = {
    (4096, 32, 8): "open-mixtral-8x7b",
    (6144, 56, 8): "open-mixtral-8x22b",
}


def hosted_aliases(args: ModelArgs) -> list[str]:
    alias = _HOSTED_ALIASES.get((args.dim, args.n_layers, args.num_experts))
    return [alias] if alias else []


@dataclass
class ServedModel:
    """The one model this server serves, under its name and aliases."""

    name: str
    args: ModelArgs
    max_model_len: int
    supports_tools: bool
    extra_aliases: list[str] = field(default_factory=list)
    created: int = field(default_factory=lambda: int(time.time()))
    # The engine's batch limit: a request's n samples run together, so n above it can never be served.
    max_num_seqs: int | None = None

    @property
    def aliases(self) -> list[str]:
        out = []
        for alias in [*self.extra_aliases, *hosted_aliases(self.args)]:
            if alias != self.name and alias not in out:
                out.append(alias)
        return out

    def resolve(self, requested: str) -> str:
        """The requested name if this server answers to it, else a 404 naming what it does answer to."""
        if requested == self.name or requested in self.aliases:
            return requested
        raise APIError(404, f"model {requested!r} not found; this server serves {[self.name, *self.aliases]}",
                       param="model", code="model_not_found")

    def card(self, model_id: str | None = None) -> ModelCard:
        """The card of ``model_id`` (the served name or one of its aliases; default: the served name)."""
        model_id = model_id or self.name
        tok = self.args.tokenizer
        description = (f"Mixtral {self.args.num_experts}x (dim {self.args.dim}, {self.args.n_layers} layers), "
                       f"tokenizer {tok}")
        if not self.supports_tools:
            description += "; no function calling (the tokenizer has no tool-call tokens)"
        names = [self.name, *self.aliases]
        return ModelCard(
            id=model_id,
            created=self.created,
            name=model_id,
            description=description,
            capabilities=ModelCapabilities(completion_chat=True, function_calling=self.supports_tools),
            max_context_length=self.max_model_len,
            max_model_len=self.max_model_len,
            root=self.name,
            aliases=[n for n in names if n != model_id],
            default_model_temperature=DEFAULT_TEMPERATURE,
        )

    def model_list(self) -> ModelList:
        return ModelList(data=[self.card(name) for name in [self.name, *self.aliases]])

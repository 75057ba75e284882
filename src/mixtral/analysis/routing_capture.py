"""Reading a prompts file and capturing, for every token of every prompt, each MoE layer's routing.

Prompts file (JSONL, one object per line; blank lines and lines starting with ``#`` are skipped)::

    {"prompt": "The capital of France is", "label": "en"}
    {"text": "Die Hauptstadt von Frankreich ist", "label": "de"}
    {"messages": [{"role": "user", "content": "Write a haiku"}], "label": "chat"}

``prompt`` / ``text`` are encoded as documents (``<s>`` first, no template); ``messages`` with the model's chat
template (mistral-common). ``label`` is optional (language, domain, ...); prompts without one count in the overall
figures only.

Capture: one full forward per prompt (``Transformer.forward_tokens`` with ``router_logits=[]``), then each layer's
logits top-k'ed exactly as the model routes (``kernels.reference.route_topk``: softmax in fp32, top-k,
renormalised), keeping the full softmax too (for the router's entropy). Not for: the statistics
(``routing_stats.py``) or the plots (``routing_plots.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixtral.kernels.reference import route_topk
from mixtral.model.context import DenseContext


@dataclass(frozen=True)
class PromptSpec:
    """One line of the prompts file."""

    line: int
    label: str | None
    text: str | None = None
    messages: list[dict[str, Any]] | None = None


@dataclass
class PromptRouting:
    """The routing of every token of one prompt."""

    label: str | None
    token_ids: list[int]
    experts: np.ndarray  # [T, L, k] int64, best first
    weights: np.ndarray  # [T, L, k] float32, renormalised over the k
    probs: np.ndarray  # [T, L, E] float32, the router's softmax over all experts


def read_prompts(path: str | Path) -> list[PromptSpec]:
    """The prompts of a JSONL file; ValueError naming the file, line and problem for a bad line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} does not exist")
    specs = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
        label = obj.get("label")
        if label is not None and not isinstance(label, (str, int)):
            raise ValueError(f"{where}: 'label' must be a string, got {label!r}")
        label = None if label is None else str(label)
        given = [key for key in ("prompt", "text", "messages") if key in obj]
        if len(given) != 1:
            raise ValueError(f"{where}: give exactly one of 'prompt', 'text' or 'messages', got {given or 'none'}")
        value = obj[given[0]]
        if given[0] == "messages":
            if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
                raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
            specs.append(PromptSpec(number, label, messages=value))
        else:
            if not isinstance(value, str) or not value:
                raise ValueError(f"{where}: '{given[0]}' must be a non-empty string, got {value!r}")
            specs.append(PromptSpec(number, label, text=value))
    if not specs:
        raise ValueError(f"prompts file {str(path)!r} holds no prompts")
    return specs


def encode(spec: PromptSpec, tokenizer: Any) -> list[int]:
    if spec.messages is not None:
        return tokenizer.encode_chat(spec.messages)
    return tokenizer.encode(spec.text or "", bos=True)


@torch.inference_mode()
def capture_routing(model: Any, token_ids: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(experts [T, L, k], weights [T, L, k], probs [T, L, E]) of one sequence, from one forward pass."""
    tokens = torch.tensor(token_ids, dtype=torch.long, device=model.device)  # [T]
    ctx = DenseContext(1, len(token_ids), model.device, model.args.sliding_window)
    router_logits: list[torch.Tensor] = []
    model.forward_tokens(tokens, ctx, router_logits)  # appends [T, E] per layer
    top_k = model.args.num_experts_per_tok
    routed = [route_topk(logits, top_k) for logits in router_logits]  # per layer: ([T, k], [T, k])
    weights = torch.stack([w for w, _ in routed], dim=1)  # [T, L, k]
    experts = torch.stack([i for _, i in routed], dim=1)  # [T, L, k]
    probs = torch.stack([torch.softmax(logits.float(), dim=-1) for logits in router_logits], dim=1)  # [T, L, E]
    return experts.cpu().numpy(), weights.float().cpu().numpy(), probs.cpu().numpy()


def route_prompt(model: Any, tokenizer: Any, spec: PromptSpec, max_tokens: int) -> PromptRouting:
    """Encode one prompt (its first ``max_tokens`` tokens) and capture its routing."""
    ids = encode(spec, tokenizer)[:max_tokens]
    if not ids:
        raise ValueError(f"line {spec.line}: the prompt encodes to no tokens")
    experts, weights, probs = capture_routing(model, ids)
    return PromptRouting(spec.label, ids, experts, weights, probs)

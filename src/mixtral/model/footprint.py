"""Bytes a model's weights take, per part, counted on the meta device (nothing is allocated).

The model is built on meta exactly as the loader builds it (the quantized weights swapped for their stored
tensors), so the count is what a load will allocate: ``mixtral info``, the pre-load memory check
(engine/memory.check_model_fits) and the per-rank memory of a tensor-parallel layout all read it.

Parts: ``attention`` (wqkv, wo), ``experts`` (w13, w2), ``router_norms`` (the router gates and every norm),
``embeddings`` (tok_embeddings) and ``lm_head`` (output). Not here: KV-cache sizing (engine/memory.py).
"""

from __future__ import annotations

import torch

from mixtral.model.args import ModelArgs
from mixtral.quant.base import QuantMethod

PARTS = ("attention", "experts", "router_norms", "embeddings", "lm_head")


def _part(name: str) -> str:
    if ".attention.wqkv" in name or ".attention.wo" in name:
        return "attention"
    if ".feed_forward.w13" in name or ".feed_forward.w2" in name:
        return "experts"
    if name.startswith("tok_embeddings"):
        return "embeddings"
    if name.startswith("output"):
        return "lm_head"
    return "router_norms"


def weight_bytes(args: ModelArgs, dtype: torch.dtype, methods: dict[str, QuantMethod] | None = None,
                 ep_rank: int = 0, ep_size: int = 1) -> dict[str, int]:
    """{part: bytes, ..., "total": bytes} of the model ``args`` in ``dtype`` with the weights in ``methods``
    (internal parameter name -> method, as the loader plans them) quantized."""
    from mixtral.model.mixtral import Transformer
    from mixtral.model.quantized import quantize_modules

    with torch.device("meta"):
        model = Transformer(args, ep_rank=ep_rank, ep_size=ep_size).to(dtype=dtype)
        if methods:
            quantize_modules(model, methods)
    out = dict.fromkeys(PARTS, 0)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        out[_part(name)] += t.numel() * t.element_size()
    out["total"] = sum(out[p] for p in PARTS)
    return out

"""The KV-cache flag shared by the commands that build an engine (serve, generate, chat, bench throughput, bench
gpu) and by ``mixtral info``: ``add_kv_cache_args(parser)`` adds ``--kv-cache-dtype`` (vLLM's name and values),
``kv_cache_kwargs(args)`` turns it into ``EngineConfig`` keyword arguments. argparse refuses other values and
lists the allowed ones.
"""

from __future__ import annotations

import argparse
from typing import Any

from mixtral.engine.config import KV_CACHE_DTYPES


def add_kv_cache_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add ``--kv-cache-dtype`` to ``parser``."""
    parser.add_argument(
        "--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
        help="what the KV cache stores: auto, the model's dtype; fp8 (alias fp8_e4m3), float8 e4m3 codes with "
             "one K and one V scale per layer: twice the tokens in the same memory, attention reads the codes "
             "directly. Scales come from the checkpoint when it carries them (compressed-tensors "
             "kv_cache_scheme, AutoFP8), else 1.0 (default: auto)")


def kv_cache_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``EngineConfig`` keyword arguments for the flag (the default where a namespace built in code lacks it)."""
    return {"kv_cache_dtype": getattr(args, "kv_cache_dtype", "auto")}

"""The ``--quantization`` flag shared by every command that loads a model (serve, generate, chat, bench
throughput / gpu, info): ``add_quantization_arg(parser)`` adds it, ``quantization_kwargs(args)`` gives the
keyword ``LLM`` / ``LLMEngine.from_config`` take (nothing when the flag is absent). vLLM's flag name and values.
"""

from __future__ import annotations

import argparse
from typing import Any

from mixtral.checkpoint.quant_load import QUANTIZATION_CHOICES

HELP = ("quantize the weights while loading a bf16/fp16/fp32 checkpoint: fp8 (e4m3 weights with a scale per "
        "output channel, activations quantized per token; half the bytes of bf16), int8 (W8A16, one scale per "
        "channel) or int4 (W4A16, a scale per group of 128 input columns, round to nearest; a quarter). The "
        "attention projections and the experts are quantized; the router, embeddings, norms and lm_head stay "
        "in --dtype. Quantized checkpoints (compressed-tensors, AutoFP8, AWQ, GPTQ, a .gguf file) are detected "
        "from their files and load as they are: leave the flag out, or name their format (awq, gptq, "
        "compressed-tensors, gguf) or scheme; a flag that conflicts with the checkpoint fails (default: as the "
        "checkpoint is)")


def add_quantization_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--quantization", "-q", choices=QUANTIZATION_CHOICES, default=None, metavar="SCHEME",
                        help=HELP + f"; one of {', '.join(QUANTIZATION_CHOICES)}")


def quantization_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``{"quantization": ...}`` when the flag was given (a namespace built in code may lack it)."""
    value = getattr(args, "quantization", None)
    return {"quantization": value} if value is not None else {}

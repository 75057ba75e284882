"""argparse ``type=`` checkers for the ``mixtral bench`` flags.

A nonsensical number (a 0-token prompt, a negative count, a NaN rate) becomes an argparse error that names the flag
and the value (``argument --input-len: must be a whole number >= 1, got '0'``) before any model is loaded, instead
of a traceback from deep in the engine minutes later. argparse adds the flag's name to the message raised here.
"""

from __future__ import annotations

import argparse
import math


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _require(value: float, ok: bool, rule: str, text: str) -> float:
    """``value`` when ``ok``, else the argparse error naming the rule and what was given."""
    if not ok:
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (counts, lengths, sizes)."""
    value = _int(text)
    return int(_require(value, value >= 1, "a whole number >= 1", text))


def positive_float(text: str) -> float:
    """A finite number > 0 (rates)."""
    value = _float(text)
    return _require(value, value > 0, "> 0", text)


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (temperatures, seconds)."""
    value = _float(text)
    return _require(value, value >= 0, ">= 0", text)


def fraction(text: str) -> float:
    """A share in (0, 1] (GPU memory utilization)."""
    value = _float(text)
    return _require(value, 0 < value <= 1, "in (0, 1]", text)


def positive_int_list(text: str) -> str:
    """Comma-separated integers >= 1, at least one (``"1,8,32"``); returned as given, for callers that split it."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"must be comma-separated whole numbers >= 1, got {text!r}")
    for item in items:
        try:
            positive_int(item)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"must be comma-separated whole numbers >= 1, got {text!r} ({item!r} is not)") from None
    return text


def length_pairs(text: str) -> str:
    """Comma-separated ``INPUT:OUTPUT`` token lengths, each >= 1 (``"128:128,1000:1000"``), or ``""`` for none;
    returned as given, for callers that split it."""
    for item in (x for x in text.split(",") if x):
        parts = item.split(":")
        try:
            if len(parts) != 2:
                raise argparse.ArgumentTypeError("")
            positive_int(parts[0])
            positive_int(parts[1])
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"must be comma-separated INPUT:OUTPUT lengths >= 1 like 128:128, got {text!r} ({item!r} is not)"
            ) from None
    return text


# ``mixtral bench gpu --peer`` names and their labels in the plot.
PEERS = {"hf": "transformers MixtralForCausalLM", "compiled": "torch.compile decode (gpt-fast style)"}


def peer_list(text: str) -> str:
    """Comma-separated peers from ``PEERS``, or ``none`` (``"hf,compiled"``); returned as given."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    bad = [item for item in items if item not in (*PEERS, "none")]
    if bad or not items or ("none" in items and len(items) > 1):
        raise argparse.ArgumentTypeError(
            f"must be 'none' or comma-separated peers from {', '.join(PEERS)}, got {text!r}")
    return text


def scheme_list(text: str) -> str:
    """Comma-separated ``--quantization`` values for ``mixtral bench gpu``, each at most once: ``none`` (the
    weights as the checkpoint is: bf16 for a preset) or a scheme / checkpoint format (``"none,fp8"``); returned
    as given, for callers that split it."""
    from mixtral.checkpoint.quant_load import QUANTIZATION_CHOICES

    allowed = ("none", *QUANTIZATION_CHOICES)
    items = [item.strip() for item in text.split(",") if item.strip()]
    bad = [item for item in items if item not in allowed]
    if bad or not items or len(set(items)) != len(items):
        why = f"{bad[0]!r} is not one of them" if bad else "each at most once" if items else "none given"
        raise argparse.ArgumentTypeError(
            f"must be comma-separated schemes from {', '.join(allowed)} ({why}), got {text!r}")
    return text

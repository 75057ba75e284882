"""Whether a prefill tile measured inside the engine replaces its table's entry, and writing it there.

``scripts/gpu_prefill_tiles.py --adopt`` times candidate ``sorted_moe`` configs in alternated rounds of whole
prefills; this module holds its rule, so a table changes only on a clear, repeatable win with equal outputs.
"""

from __future__ import annotations

import datetime
import json
import statistics
from pathlib import Path

from mixtral.bench.tune_moe import write_configs
from mixtral.kernels.triton.moe_configs import MoEConfig

# A candidate replaces the table's entry only if its mean prefill is this much shorter, it was faster in this
# share of the alternated rounds, and its hidden states match the entry's: one-off bursts overrated several
# tiles before (BENCHMARKS.md, stops 11-12).
MIN_MEAN_GAIN, MIN_WIN_SHARE, MAX_REL_ERR = 0.005, 0.7, 1e-2


def adoption(runs_ms: dict[str, list[float]], errors: dict[str, float], base: str = "tuned"
             ) -> tuple[str | None, list[str]]:
    """The candidate to adopt over ``base`` (or None) and one line of reasons per candidate. Round i of every
    candidate ran in the same alternation, so rounds are compared pairwise."""
    ref = statistics.mean(runs_ms[base])
    best, best_gain, lines = None, 0.0, []
    for label, ts in runs_ms.items():
        if label == base:
            continue
        gain = 1 - statistics.mean(ts) / ref
        wins = sum(a < b for a, b in zip(ts, runs_ms[base], strict=True)) / len(ts)
        err = errors.get(label, float("nan"))
        ok = err <= MAX_REL_ERR and gain >= MIN_MEAN_GAIN and wins >= MIN_WIN_SHARE  # NaN error: never
        lines.append(f"{label}: mean {gain:+.2%} against {base}, faster in {wins:.0%} of rounds, "
                     f"hidden states rel. error {err:.1e}{' (eligible)' if ok else ''}")
        if ok and gain > best_gain:
            best, best_gain = label, gain
    return best, lines


def adopt(table: Path, length: int, label: str, cfg: MoEConfig, reasons: list[str], device: str, layers: int
          ) -> None:
    """Write ``cfg`` at ``length`` tokens into ``table`` (the tuner's writer, merging: the other entries and
    notes stay) with a note saying what chose it. ``time_us`` keeps the tuner's burst time of the entry."""
    notes = json.loads(table.read_text()).get("adoption_notes", {}) | {str(length): (
        f"{label}, chosen by scripts/gpu_prefill_tiles.py inside {layers}-layer prefills on {device}, "
        f"{datetime.date.today()}: " + "; ".join(reasons))}
    write_configs(table, {length: cfg}, {}, {"adoption_notes": notes}, merge=True)

"""How a lone prefill's speed depends on what the GPU did just before: rounds of a pause (the GPU idle, as
before a lone request on a quiet server) followed by back-to-back prefills, each timed, with the board's
temperature, power and SM clock read just before it (NVML, through torch.cuda).

    PYTHONPATH=src python3 scripts/gpu_prefill_rest.py --layers 32 --rest 2 --burst 5 --rounds 6 --json out.json

Prints each prefill's time and % of the bf16 peak by its place in the burst (0: right after the pause).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from gpu_prefill_breakdown import prefill_args, prefill_once, prefill_setup  # scripts/ is sys.path[0]


def board() -> dict[str, float]:
    """Temperature (C), power (W) and SM clock (MHz) now; empty where NVML is not available."""
    try:
        return {"temp_c": float(torch.cuda.temperature()), "power_w": torch.cuda.power_draw() / 1e3,
                "sm_mhz": float(torch.cuda.clock_rate())}
    except Exception:  # no pynvml: the times alone still answer the question
        return {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    prefill_args(ap, layers=32, rounds_of="burst position")
    ap.add_argument("--rest", type=float, default=2.0, help="seconds idle before each burst")
    ap.add_argument("--burst", type=int, default=5, help="back-to-back prefills after each pause")
    args = ap.parse_args()
    engine, flops, peak = prefill_setup(args)
    vocab = engine.model_args.vocab_size
    seed = 0
    for _ in range(2):  # warm-up: compile and capture paths
        prefill_once(engine, args.length, vocab, seed := seed + 1)
    runs: list[dict[str, float]] = []
    for r in range(args.rounds):
        time.sleep(args.rest)
        for i in range(args.burst):
            before = board()
            t = prefill_once(engine, args.length, vocab, seed := seed + 1)
            runs.append({"round": r, "position": i, "ms": t * 1e3, "fraction_of_peak": flops / t / peak} | before)
            print(f"round {r} position {i}: {t * 1e3:7.2f} ms {flops / t / peak:6.1%}  "
                  + " ".join(f"{k} {v:.0f}" for k, v in before.items()), flush=True)
    summary = {}
    for i in range(args.burst):
        ts = [x["ms"] for x in runs if x["position"] == i]
        med = statistics.median(ts)
        summary[i] = {"median_ms": med, "fraction_of_peak_median": flops / (med / 1e3) / peak,
                      "best_fraction": flops / (min(ts) / 1e3) / peak}
        print(f"position {i}: median {med:7.2f} ms = {flops / (med / 1e3) / peak:.1%} of peak, best "
              f"{summary[i]['best_fraction']:.1%}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "layers": args.layers, "rest_s": args.rest,
                       "summary": summary, "runs": runs}, fh, indent=1)


if __name__ == "__main__":
    main()

"""Where a batch-1 decode step's time goes on the GPU: the captured forward alone, the whole engine step,
and a host-side profile of the difference.

    PYTHONPATH=src python3 scripts/gpu_step_breakdown.py --model mixtral-8x7b --layers 16
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from mixtral.engine.llm_engine import LLMEngine
from mixtral.model.args import PRESETS
from mixtral.sampling import SamplingParams


def timed(fn, n: int) -> float:  # type: ignore[no-untyped-def]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mixtral-8x7b")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    name = f"{args.model}-{args.layers}l"
    PRESETS[name] = PRESETS[args.model].replace(n_layers=args.layers)
    engine = LLMEngine.from_config(name, device="cuda", dtype="bf16", max_model_len=2048, max_num_seqs=64,
                                   enable_prefix_caching=False, gpu_memory_utilization=0.9)
    for i in range(args.batch):
        engine.add_request(str(i), list(range(1000 + i, 1512 + i)),
                           SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True))
    for _ in range(5):
        engine.step()
    runner = engine.model_runner
    graphs = runner.graphs
    b = graphs.graph_size(args.batch)
    step_ms = timed(engine.step, 50)
    replay_ms = timed(graphs.graphs[b].replay, 50)
    hidden = graphs.outputs[b][: args.batch]
    with torch.inference_mode():
        logits_ms = timed(lambda: runner.model.compute_logits(hidden), 50)
    print(f"batch {args.batch}: engine.step {step_ms:.3f} ms | graph replay {replay_ms:.3f} ms | "
          f"lm_head {logits_ms:.3f} ms | other {step_ms - replay_ms - logits_ms:.3f} ms")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(30):
        engine.step()
    pr.disable()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(25)
    print(out.getvalue())


if __name__ == "__main__":
    main()

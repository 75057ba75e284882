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
    step_ms = timed(engine.step, 50)  # async scheduling (the CUDA default)
    engine._overlap = False
    engine.step()  # drains the step launched ahead
    sync_ms = timed(engine.step, 50)
    replay_ms = timed(graphs.graphs[b].replay, 50)
    hidden = graphs.outputs[b][: args.batch]
    with torch.inference_mode():
        logits_ms = timed(lambda: runner.model.compute_logits(hidden), 50)
    print(f"batch {args.batch}: engine.step {step_ms:.3f} ms async, {sync_ms:.3f} ms sync | graph replay "
          f"{replay_ms:.3f} ms | lm_head {logits_ms:.3f} ms | sync other {sync_ms - replay_ms - logits_ms:.3f} ms")
    try:  # kernels inside the graph, by total GPU time (CUPTI traces graph kernels on recent drivers)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                graphs.graphs[b].replay()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    except Exception as exc:  # profiling is a bonus: never lose the timings above to it
        print(f"kernel profile failed: {type(exc).__name__}: {exc}")
    engine._overlap = True
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

"""Where a batch-1 decode step's time goes on the GPU: the captured forward alone, the whole engine step,
and a host-side profile of the difference.

    PYTHONPATH=src python3 scripts/gpu_step_breakdown.py --model mixtral-8x7b --layers 16
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time

import torch

from mixtral.engine.llm_engine import LLMEngine
from mixtral.model.presets import PRESETS
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
    ap.add_argument("--model", default="mixtral-8x7b", help="preset whose shapes are built (random weights)")
    ap.add_argument("--layers", type=int, default=16, help="layers to build (16 of 8x7B fit an H100)")
    ap.add_argument("--batch", type=int, default=1, help="decode batch size of the replayed step")
    ap.add_argument("--json", default="", help="also write the timings and the per-kernel table here")
    args = ap.parse_args()
    result: dict[str, object] = {"device": torch.cuda.get_device_name(), "model": args.model, "layers": args.layers,
                                 "batch": args.batch}
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
    result.update(step_async_ms=step_ms, step_sync_ms=sync_ms, replay_ms=replay_ms, lm_head_ms=logits_ms)
    try:  # kernels inside the graph, by total GPU time (CUPTI traces graph kernels on recent drivers)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                graphs.graphs[b].replay()
            torch.cuda.synchronize()
        averages = prof.key_averages()
        print(averages.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
        # Kernel time per replay against the replay's wall time: the rest is the gaps between kernels.
        kernels = sorted(((e.key, e.count / 10, e.self_device_time_total / 10) for e in averages
                          if e.self_device_time_total > 0), key=lambda r: -r[2])
        busy_ms = sum(r[2] for r in kernels) / 1e3
        n_kernels = sum(r[1] for r in kernels)
        print(f"kernels per replay: {n_kernels:.0f}, busy {busy_ms:.3f} ms of {replay_ms:.3f} "
              f"(gaps {(replay_ms - busy_ms) * 1e3 / max(n_kernels, 1):.2f} us a kernel)")
        if engine.model_runner.model.kernels.config.pdl:
            print("  with PDL each kernel's time includes its wait for the one before: the times overlap and the "
                  "busy sum exceeds the replay; KernelConfig(pdl=False) gives additive per-kernel times")
        result.update(busy_ms=busy_ms, kernels_per_replay=n_kernels,
                      kernels=[{"name": k[:120], "per_replay": c, "us_per_replay": t} for k, c, t in kernels])
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

"""What a bf16 GEMM sustains on this GPU under its power cap: cuBLAS and the prefill MoE's w13 GEMM, in short
bursts after an idle second and after seconds of continuous load, beside the board power and SM clock; and
an HBM stream (a 2 GiB copy), whose power per TB/s prices the expert weights a grouped GEMM must read.

The prefill figure of ``mixtral bench gpu`` is ~100 ms of back-to-back GEMMs; on an H200 the board sits at its
700 W cap there and the SM clock drops from 1980 MHz. This script separates what a kernel could do per clock
from what the cap allows any kernel.

    PYTHONPATH=src python3 scripts/gpu_power_ceiling.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time

import torch

from mixtral.bench.cuda_timing import capture
from mixtral.bench.tune_sorted_moe import prefill_problem_8x7b
from mixtral.kernels.triton.sorted_moe import invoke_w13


def smi() -> dict[str, float]:
    """Board power (W) and SM clock (MHz) now, from nvidia-smi."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=power.draw,clocks.sm", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout.split(",")
    return {"power_W": float(out[0]), "sm_MHz": float(out[1])}


def replay_ms(graph: torch.cuda.CUDAGraph, per_graph: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / per_graph


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048, help="prefill tokens (the GEMMs' rows: 2x pairs)")
    ap.add_argument("--seconds", type=float, default=4.0, help="continuous load before the sustained figure")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    dev = torch.device("cuda")
    gen, w13, w2, xs, offs, cfg = prefill_problem_8x7b(args.tokens, dev)  # xs [P, D], offs [E]
    p, f, d = xs.shape[0], w2.shape[2], w2.shape[1]
    del w2
    act = torch.empty(p, f, device=dev, dtype=torch.bfloat16)
    dense_b = torch.randn(2 * f, d, device=dev, generator=gen, dtype=torch.bfloat16) * d**-0.5  # [2F, D]
    dense_out = torch.empty(p, 2 * f, device=dev, dtype=torch.bfloat16)
    flops = 4 * p * d * f  # both: [P, D] x [D, 2F]
    src = torch.empty(1 << 30, dtype=torch.bfloat16, device=dev)  # 2 GiB each way: an HBM stream
    dst = torch.empty_like(src)
    per_graph = 10
    # name -> (one launch, its work, unit): TFLOP/s for the GEMMs, TB/s (read + write) for the stream.
    runs = {
        "cublas dense [P, D] x [D, 2F]": (lambda: torch.mm(xs, dense_b.T, out=dense_out), flops, "TFLOP/s"),
        "w13 grouped (tuned sorted_moe)": (lambda: invoke_w13(xs, w13, act, offs, cfg.block_m, cfg.w13, True,
                                                              cfg.small_m), flops, "TFLOP/s"),
        "HBM stream (2 GiB copy)": (lambda: dst.copy_(src), 2 * src.numel() * 2, "TB/s"),
    }
    torch.cuda.synchronize()
    time.sleep(2.0)
    report: dict[str, dict[str, object]] = {"idle": smi()}
    print(f"idle: {report['idle']['power_W']:.0f} W, {report['idle']['sm_MHz']:.0f} MHz")
    for name, (fn, work, unit) in runs.items():
        graph, _ = capture(lambda fn=fn: [fn() for _ in range(per_graph)])
        torch.cuda.synchronize()
        time.sleep(1.5)  # idle: clocks back up, board cool
        burst = replay_ms(graph, per_graph)
        t0 = time.time()
        while time.time() - t0 < args.seconds:  # continuous load until the power cap holds the clock down
            graph.replay()
            torch.cuda.synchronize()  # keeps the queue short: the loop ends when the load does
        during: list[dict[str, float]] = []
        sustained = []
        for _ in range(8):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                graph.replay()
            end.record()
            during.append(smi())  # sampled while the replays run: the host is ahead of the GPU here
            end.synchronize()
            sustained.append(start.elapsed_time(end) / (5 * per_graph))
        med = sorted(sustained)[len(sustained) // 2]
        power = sorted(s["power_W"] for s in during)[len(during) // 2]
        clock = sorted(s["sm_MHz"] for s in during)[len(during) // 2]
        report[name] = {"unit": unit, "burst_ms": burst, "burst_rate": work / burst / 1e9, "sustained_ms": med,
                        "sustained_rate": work / med / 1e9, "power_W": power, "sm_MHz": clock,
                        "sustained_smi": during}
        print(f"{name:34s} burst {work / burst / 1e9:5.0f} {unit}, sustained {work / med / 1e9:5.0f} {unit} "
              f"at {power:.0f} W, {clock:.0f} MHz", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "tokens": args.tokens, "results": report}, fh, indent=1)


if __name__ == "__main__":
    main()

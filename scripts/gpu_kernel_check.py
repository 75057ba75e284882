#!/usr/bin/env python3
"""GPU correctness sweep and timing of the Triton kernels, against kernels/reference.py and the roofline.

What it does, in one process on one GPU:
1. measures the copy bandwidth (a large device-to-device copy, bytes read + written);
2. checks every kernel against the PyTorch reference (computed in fp32 from the same inputs): fused MoE at
   Mixtral-8x7B (D 4096, F 14336) and 8x22B (D 6144, F 16384) dims, batch 1..512, bf16 and fp16, expert
   parallel; paged attention decode (batch 1..512, ragged contexts, block boundaries, split-K) and ragged
   prefill with GQA 4 and 6; write_kv; and a CUDA-graph capture + replay of fused MoE and paged decode;
3. times the fused MoE alone (CUDA-graph replay) at batch 1, 8, 16, 64, 256 against the bytes of the
   experts actually hit, and paged decode / prefill attention.
Prints a summary table last and writes everything to ``--json``.

    PYTHONPATH=src python3 scripts/gpu_kernel_check.py --json out.json     # on a CUDA GPU
    python scripts/gpu_kernel_check.py --smoke                             # CPU: interpreter, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

RESULTS: dict[str, Any] = {"moe_check": [], "attn_check": [], "moe_time": [], "attn_time": [], "errors": []}


def log(msg: str) -> None:
    print(msg, flush=True)


def section(name: str, fn: Callable[[], None]) -> None:
    """Run one part; a failure is recorded and the next part still runs."""
    t0 = time.monotonic()
    log(f"== {name}")
    try:
        fn()
    except Exception:  # keep going: a broken part must not hide the others' numbers
        tb = traceback.format_exc()
        log(tb)
        RESULTS["errors"].append({"section": name, "traceback": tb[-2000:]})
    log(f"   ({time.monotonic() - t0:.1f} s)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="run the correctness part on CPU through Triton's interpreter with tiny shapes")
    p.add_argument("--json", default=None, help="write all results to this JSON file")
    p.add_argument("--commit", default="", help="commit id to record (the device copy has no git history)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: moe,attn,graph,time")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the fused MoE pieces (align, w13, w2 tile variants) at batch 1 and 8")
    args = p.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch
    import triton

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
    from gpu_kernel_check_parts import Parts  # sibling module, imported after the env var is set

    dev = torch.device("cpu" if args.smoke else "cuda")
    RESULTS.update(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter)",
                   torch=torch.__version__, triton=triton.__version__, commit=args.commit,
                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    log(f"device {RESULTS['device']}  torch {torch.__version__}  triton {triton.__version__}  commit {args.commit}")
    parts = Parts(dev, RESULTS, log, smoke=args.smoke)
    skip = set(args.skip.split(","))
    if not args.smoke:
        section("copy bandwidth", parts.copy_bandwidth)
    if "moe" not in skip:
        section("fused MoE correctness", parts.check_moe)
    if "attn" not in skip:
        section("paged attention / write_kv correctness", parts.check_attention)
    if not args.smoke and "graph" not in skip:
        section("CUDA graph capture", parts.check_graphs)
    if not args.smoke and "time" not in skip:
        section("fused MoE timing", parts.time_moe)
        section("paged attention timing", parts.time_attention)
    if not args.smoke and args.breakdown:
        section("fused MoE breakdown", parts.moe_breakdown)
    parts.summary()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(RESULTS, f, indent=1)
    failed = [c for c in RESULTS["moe_check"] + RESULTS["attn_check"] if not c["ok"]]
    return 1 if failed or RESULTS["errors"] else 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    raise SystemExit(main())

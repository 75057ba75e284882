"""Time the integer schemes' CPU matmul paths against bf16 and the reference, at decode and prefill row counts.

For each weight shape and row count M: ``F.linear`` on a bf16 copy of the weight (what a bf16 model does),
the reference (dequantize the canonical tensors, then ``F.linear``), and the int methods' CPU path on the
packed layout (quant/int_cpu.py): int4 g128, int8 per channel, int8 g32 (GGUF Q8_0: two int4 packed matmuls).
Prints the best of ``--reps`` (the minimum is the most stable figure on a shared machine) in microseconds.

    PYTHONPATH=src python scripts/cpu_int_matmul.py --shapes demo,8x7b --threads 2
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from mixtral.quant.int_layout import IntFormat, quantize_rtn
from mixtral.quant.int_method import method_for_format, reference_linear

SHAPES = {
    "demo": [(320, 192), (192, 320), (640, 192)],  # wqkv, w2 (one expert), w13 (one expert) of the demo model
    "8x7b": [(6144, 4096), (4096, 14336), (28672, 4096)],  # wqkv, w2, w13 of one expert
}
SCHEMES = {"int4 g128": IntFormat(4, 128, torch.float16, "none"),
           "int8 channel": IntFormat(8, 0, torch.float16, "none"),
           "int8 g32 (Q8_0)": IntFormat(8, 32, torch.float16, "none")}


def best_us(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="demo,8x7b", help="comma-separated: demo (the bundled model), 8x7b")
    ap.add_argument("--rows", default="1,2,4,8,64,512", help="comma-separated row counts M (tokens)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions per figure; the best is kept (default: 7)")
    ap.add_argument("--no-reference", action="store_true", help="skip the (slow) dequantize-then-matmul reference")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [int(m) for m in args.rows.split(",")]
    print(f"threads {args.threads}, best of {args.reps}, microseconds; torch {torch.__version__}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}")
    for group in args.shapes.split(","):
        for n, k in SHAPES[group]:
            w = torch.randn(n, k) * 0.02
            dense = w.to(torch.bfloat16)
            packed = {}
            for name, fmt in SCHEMES.items():
                fmt = fmt if not fmt.group_size or k % fmt.group_size == 0 else IntFormat(4, 64, torch.float16)
                method = method_for_format(fmt, "bf16")
                canonical = quantize_rtn(w, fmt)
                packed[name] = (method, canonical, method.process_after_loading(canonical, torch.bfloat16))
            for m in rows:
                reps = args.reps if n * k * max(m, 8) < 5e8 else max(2, args.reps // 3)
                x = torch.randn(m, k, dtype=torch.bfloat16)
                line = [f"{group} N={n} K={k} M={m}:", f"bf16 {best_us(partial(F.linear, x, dense), reps):10.0f}"]
                for name, (method, _, prep) in packed.items():
                    line.append(f"{name} {best_us(partial(method.linear, x, prep), reps):10.0f}")
                if not args.no_reference:
                    ref = partial(reference_linear, x, packed["int4 g128"][1])
                    line.append(f"reference int4 {best_us(ref, reps):10.0f}")
                print("  ".join(line), flush=True)


if __name__ == "__main__":
    main()

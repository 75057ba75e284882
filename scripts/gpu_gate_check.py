"""Quick GPU check of the fused router against the Linear + route_topk + index_add path (exit 1 on mismatch).

    PYTHONPATH=src python3 scripts/gpu_gate_check.py    # on failure: serve with --no-fused-gate
"""

from __future__ import annotations

import sys

import torch

from mixtral.kernels.reference import route_topk
from mixtral.kernels.triton.gate_router import gate_route_fused


def main() -> int:
    gen = torch.Generator(device="cuda").manual_seed(0)
    ok = True
    for dtype in (torch.bfloat16, torch.float32):
        for d in (4096, 6144):
            for n in (1, 7, 64, 256):
                x = torch.randn(n, d, device="cuda", generator=gen).to(dtype)
                w = (torch.randn(8, d, device="cuda", generator=gen) * d**-0.5).to(dtype)
                counts = torch.zeros(8, dtype=torch.int64, device="cuda")
                logits, weights, ids = gate_route_fused(x, w, 2, counts)
                ref = torch.nn.functional.linear(x.float(), w.float())
                err = ((logits.float() - ref).abs() / (1 + ref.abs())).max().item()
                ref_w, ref_ids = route_topk(logits, 2)
                probs = torch.softmax(logits.float(), dim=-1)
                # bf16 logits tie often; torch.topk may order exact ties differently: accept equal probabilities.
                same = bool(((ids == ref_ids) | (probs.gather(1, ids) == probs.gather(1, ref_ids))).all())
                good = (err < (1e-2 if dtype == torch.bfloat16 else 1e-5) and same
                        and bool(torch.allclose(weights, ref_w, atol=1e-5)) and int(counts.sum()) == 2 * n)
                ok &= good
                print(f"{dtype} D={d} N={n}: {'ok' if good else 'FAIL'} logit err {err:.1e}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

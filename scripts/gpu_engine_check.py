"""GPU check of the whole engine: the fast path (Triton kernels + CUDA graphs) against the reference path.

Run on a CUDA machine (through the device tool):
    TRITON_F32_DEFAULT=ieee PYTHONPATH=src python3 scripts/gpu_engine_check.py --json out.json

1. fp32 (Triton dots in IEEE precision): 24 greedy requests of mixed prompt lengths through the engine with
   the PyTorch reference kernels (KernelConfig(backend="reference"), eager, synchronous steps) and with the fast path
   (graphs, async scheduling) must give identical tokens; graphs on == graphs off, and async scheduling on ==
   off with seeded random sampling and stop tokens too.
2. bf16: the same requests, reported (not a pass criterion): rounding differs between kernels, so greedy
   paths part at some point; the report says how many part first at a near-tie of the bf16 reference model.
Exits non-zero when the fp32 comparison fails.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
from typing import Any

import torch

from mixtral.engine.llm_engine import LLMEngine
from mixtral.kernels.config import KernelConfig
from mixtral.model.args import ModelArgs
from mixtral.model.mixtral import Transformer, init_random_weights
from mixtral.model.presets import PRESETS
from mixtral.sampling import SamplingParams

# head_dim 128, 4 query heads per KV head, 8 experts top-2: Mixtral's attention and MoE shapes, scaled down.
MID = ModelArgs(dim=1024, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=128, hidden_dim=2048, vocab_size=32768,
                max_seq_len=4096, tokenizer="v3")


def requests(n: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    lens = torch.randint(3, 300, (n,), generator=gen).tolist()
    return [torch.randint(1000, vocab, (length,), generator=gen).tolist() for length in lens]


def build(args: ModelArgs, std: float) -> Transformer:
    """Random weights on the CPU in fp32, std large enough that greedy choices are not coin flips."""
    model = Transformer(args)
    init_random_weights(model, seed=0, std=std)
    return model.eval()


def run_engine(base: Transformer, dtype: str, prompts: list[list[int]], max_tokens: int, *, reference: bool,
               eager: bool, async_scheduling: bool = True, sampled: bool = False
               ) -> tuple[list[list[int]], list[int], torch.Tensor]:
    """Tokens of every prompt, the batch sizes the engine captured graphs for (freed afterwards), and the
    engine's expert-utilization counts [L, E]."""
    engine = LLMEngine.from_config(copy.deepcopy(base), device="cuda", dtype=dtype, max_model_len=1024,
                                   max_num_seqs=32, enforce_eager=eager, gpu_memory_utilization=0.5, seed=0,
                                   async_scheduling=async_scheduling and not reference,
                                   kernels=KernelConfig(backend="reference" if reference else "auto"))
    for i, p in enumerate(prompts):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        if sampled:  # seeded random rows, varied lengths and a stop token: rows finish at different steps
            params = SamplingParams(temperature=0.8, top_p=0.95, seed=i, max_tokens=max_tokens - i % 7,
                                    stop_token_ids=[1000 + i], ignore_eos=True)
        engine.add_request(str(i), p, params)
    outs: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = list(o.outputs[0].token_ids)
    graphs = engine.model_runner.graphs
    sizes = sorted(graphs.graphs) if graphs is not None else []
    counts = engine.expert_counts()
    del engine, graphs
    gc.collect()
    torch.cuda.empty_cache()
    return [outs[str(i)] for i in range(len(prompts))], sizes, counts


def near_tie_ok(base: Transformer, prompts: list[list[int]], ref: list[list[int]], fast: list[list[int]],
                tol: float) -> tuple[int, int]:
    """(sequences that differ, of those how many diverge first at a near-tie of the bf16 reference model)."""
    model = copy.deepcopy(base).to(device="cuda", dtype=torch.bfloat16)
    model.set_kernel_config(KernelConfig(backend="reference"))
    differ = ties = 0
    for p, a, b in zip(prompts, ref, fast, strict=True):
        if a == b:
            continue
        differ += 1
        t = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
        ids = torch.tensor([p + a[:t]], device="cuda")
        with torch.no_grad():
            logits = model(ids)[0, -1].float()  # [V] the reference path's next-token logits
        top = logits.topk(2).values
        if (top[0] - logits[b[t]]).item() <= tol and (top[0] - top[1]).item() <= tol:
            ties += 1
    del model
    torch.cuda.empty_cache()
    return differ, ties


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens generated per prompt in each comparison")
    args = ap.parse_args()
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "f32_default":
                               os.environ.get("TRITON_F32_DEFAULT")}
    ok = True
    for name, margs, std in (("tiny", PRESETS["tiny"], 0.1), ("mid", MID, 0.05)):
        model = build(margs, std)
        prompts = requests(24, margs.vocab_size)
        t0 = time.time()
        ref, _, ref_counts = run_engine(model, "fp32", prompts, args.max_tokens, reference=True, eager=True)
        fast, sizes, _ = run_engine(model, "fp32", prompts, args.max_tokens, reference=False, eager=False)
        eager, _, _ = run_engine(model, "fp32", prompts, args.max_tokens, reference=False, eager=True)
        sync, _, sync_counts = run_engine(model, "fp32", prompts, args.max_tokens, reference=False, eager=False,
                             async_scheduling=False)
        # Same tokens, same routing: the fused router's counts (graph padding rows masked) equal the reference's.
        same_counts = bool(torch.equal(sync_counts, ref_counts))
        samp_async, _, _ = run_engine(model, "fp32", prompts, args.max_tokens, reference=False, eager=False,
                                   sampled=True)
        samp_sync, _, _ = run_engine(model, "fp32", prompts, args.max_tokens, reference=False, eager=False,
                                  async_scheduling=False, sampled=True)
        same_ref = sum(a == b for a, b in zip(ref, fast, strict=True))
        same_eager = sum(a == b for a, b in zip(eager, fast, strict=True))
        same_sync = sum(a == b for a, b in zip(sync, fast, strict=True))
        same_sampled = sum(a == b for a, b in zip(samp_sync, samp_async, strict=True))
        r = {"fp32_equal_to_reference": same_ref, "fp32_graphs_equal_to_eager": same_eager,
             "fp32_async_equal_to_sync": same_sync, "fp32_sync_expert_counts_equal": same_counts,
             "fp32_sampled_async_equal_to_sync": same_sampled,
             "graphs_captured": sizes, "seconds": round(time.time() - t0, 1)}
        ok &= (same_ref == len(prompts) and same_eager == len(prompts) and same_sync == len(prompts)
               and same_sampled == len(prompts) and same_counts and bool(sizes))

        ref16, _, _ = run_engine(model, "bf16", prompts, args.max_tokens, reference=True, eager=True)
        fast16, _, _ = run_engine(model, "bf16", prompts, args.max_tokens, reference=False, eager=False)
        differ, ties = near_tie_ok(model, prompts, ref16, fast16, tol=0.15)
        r.update(bf16_equal=len(prompts) - differ, bf16_differ_at_near_tie=ties)
        results[name] = r
        print(name, r, flush=True)
    results["ok"] = bool(ok)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""What quantization costs in quality: ``mixtral bench quality`` (or ``python -m mixtral.bench.quant_quality``).

Three measurements, each scheme (fp8, int8, int4) against bf16, reproducible on a CPU:

1. **Held-out perplexity of the demo model** (docs/DEMO_MODEL.md): on freshly generated synthetic chats
   (assistant tokens only; the generator is seeded, so the texts are the same everywhere) and, with
   ``--texts FILE`` (one JSON string a line; ``scripts/demo/demo_heldout.py --dump-texts FILE`` writes the
   fortunes neither training stage saw), on open text.
2. **Greedy agreement** on ``--prompts`` chat prompts (the user turn of fresh synthetic conversations, tools
   offered where the conversation had them), decoded by the engine (``LLM``): the share of prompts whose
   ``--max-tokens`` greedy tokens equal bf16's, and the share of all generated tokens before the first
   difference. ``--schemes ...,fp32`` adds the unquantized model in fp32 as a calibration row: how often bf16's
   own rounding already changes this model's greedy output.
3. **Per-layer output error on real-shaped random layers** (Mixtral-8x7B: wqkv [6144, 4096], wo [4096, 4096],
   one expert's w13 [28672, 4096] and w2 [4096, 14336]; N(0, 0.02) weights in bf16, N(0, 1) inputs):
   ||y - y_fp32|| / ||y_fp32|| of each scheme's multiplication against the fp32 product of the same bf16
   weights, beside bf16's own. ``--layer-scale S`` divides every shape by S (the CPU test).

Everything runs on the CPU in bf16 (the int schemes through the CPU kernel ``--cpu-int-kernel`` picks: ``packed``,
PyTorch's packed matmuls with bf16 activations, what the GPU kernels compute; ``native``, the integer-dot kernel
with int8 activations; FP8 through its reference, which is what the GPU kernels compute). Not here: FP8
KV-cache quality (docs/QUANTIZATION.md has its section), speed (``mixtral bench gpu``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mixtral.kernels.config import KernelConfig

SCHEMES = ("fp8", "int8", "int4")
# Not a quantization: the unquantized model in fp32, against bf16: how far any rounding moves this model.
CALIBRATION = "fp32"
# Mixtral-8x7B's projection shapes [out, in]: wqkv, wo, one expert's w13 (w1 and w3 rows) and w2.
LAYER_SHAPES = {"wqkv": (6144, 4096), "wo": (4096, 4096), "expert_w13": (28672, 4096), "expert_w2": (4096, 14336)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="model to measure (default: the bundled demo model)")
    p.add_argument("--schemes", default=",".join(SCHEMES),
                   help=f"comma-separated schemes, from {','.join(SCHEMES)} and {CALIBRATION} (the unquantized model "
                        f"in fp32: how much bf16's own rounding moves the results) (default: {','.join(SCHEMES)})")
    p.add_argument("--chats", type=int, default=200, metavar="N",
                   help="fresh synthetic chats scored for perplexity (default: 200, as docs/DEMO_MODEL.md)")
    p.add_argument("--texts", type=Path, default=None, metavar="FILE",
                   help="also score these documents, one JSON string a line (e.g. the held-out fortunes that "
                        "scripts/demo/demo_heldout.py --dump-texts writes)")
    p.add_argument("--prompts", type=int, default=64, metavar="N", help="prompts for greedy agreement (default: 64)")
    p.add_argument("--max-tokens", type=int, default=32, metavar="N",
                   help="greedy tokens per prompt (default: 32)")
    p.add_argument("--layer-scale", type=int, default=1, metavar="S",
                   help="divide the 8x7B layer shapes by S (default: 1, the real shapes)")
    p.add_argument("--layer-tokens", type=int, default=64, metavar="N",
                   help="input rows for the per-layer error (default: 64)")
    p.add_argument("--skip-layers", action="store_true", help="skip the per-layer measurement")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--cpu-int-kernel", choices=("packed", "native"), default="packed",
                   help="the CPU kernel of the int schemes: packed (bf16 activations, what the GPU kernels compute) "
                        "or native (the integer-dot kernel, int8 activations in blocks of 32) (default: packed)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results as JSON to OUT")


# --------------------------------------------------------------------------- data
def chat_docs(n: int, seed: int = 12345) -> list[tuple[list[int], list[int]]]:
    """(ids, codes) of ``n`` fresh synthetic chats: demo_heldout.py's second held-out set."""
    from mixtral.train.data import Encoder
    from mixtral.train.synthetic import ConversationGenerator

    enc = Encoder("v3")
    return [enc.encode_chat(c) for c in ConversationGenerator(seed, {"en": ["A new saying."]}, 0.7).generate(n)]


def text_docs(path: Path) -> list[tuple[list[int], list[int]]]:
    from mixtral.train.data import Encoder

    enc = Encoder("v3")
    return [enc.encode_text(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def chat_prompts(n: int, seed: int = 54321) -> list[list[int]]:
    """The first user turn (and tools) of ``n`` fresh conversations, as the chat template renders it."""
    from mixtral.tokenizer import Tokenizer
    from mixtral.train.synthetic import ConversationGenerator

    tok = Tokenizer.from_version("v3")
    convs = ConversationGenerator(seed, {"en": ["A new saying.", "Time is money."]}, 0.7).generate(n)
    return [tok.encode_chat([c["messages"][0]], c.get("tools")) for c in convs]


# --------------------------------------------------------------------------- measurements
@torch.no_grad()
def perplexity(model: torch.nn.Module, docs: list[tuple[list[int], list[int]]]) -> tuple[float, int]:
    """exp(mean NLL) over the TARGET positions of encoded docs (ids, codes), and how many positions that is
    (the rule of scripts/demo/demo_heldout.py, which calls this)."""
    from mixtral.train.data import TARGET

    total, count = 0.0, 0
    for ids, codes in docs:
        x = torch.tensor([ids])
        logp = torch.log_softmax(model(x)[0, :-1].float(), dim=-1)  # [T-1, V]
        mask = torch.tensor(codes[1:]) == TARGET
        total += float(-logp.gather(1, x[0, 1:, None])[:, 0][mask].sum())
        count += int(mask.sum())
    return math.exp(total / max(count, 1)), count


def greedy(llm: Any, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from mixtral.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def agreement(ref: list[list[int]], got: list[list[int]]) -> dict[str, float]:
    same = sum(a == b for a, b in zip(ref, got, strict=True))
    prefix = 0
    for a, b in zip(ref, got, strict=True):
        prefix += next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
    total = sum(len(a) for a in ref)
    return {"identical_prompts": same / len(ref), "tokens_before_first_difference": prefix / max(total, 1)}


def layer_errors(schemes: list[str], scale: int, tokens: int, seed: int = 0, kernels: KernelConfig | None = None
                 ) -> dict[str, dict[str, float]]:
    """{layer: {scheme or "bf16": relative error against the fp32 product}} on random 8x7B-shaped layers, the
    int schemes through ``kernels``' CPU kernel (default: packed)."""
    from mixtral.checkpoint.quant_load import flag_spec
    from mixtral.kernels.dispatch import Kernels
    from mixtral.model.args import ModelArgs
    from mixtral.quant import get_method

    gen = torch.Generator().manual_seed(seed)
    config = kernels or KernelConfig(cpu_int_kernel="packed")
    ops = Kernels(config)
    out: dict[str, dict[str, float]] = {}
    for name, (n, k) in LAYER_SHAPES.items():
        n, k = n // scale, k // scale
        w = (torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16)  # [N, K]
        x = torch.randn(tokens, k, generator=gen).to(torch.bfloat16)  # [M, K]
        exact = x.float() @ w.float().T  # [M, N] the fp32 product of the bf16 operands

        def rel(y: torch.Tensor, exact: torch.Tensor = exact) -> float:
            return float((y.float() - exact).norm() / exact.norm())

        row = {"bf16": rel(torch.nn.functional.linear(x, w))}
        for scheme in schemes:
            width = ModelArgs(dim=k, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=k, hidden_dim=k, vocab_size=8)
            method = get_method(flag_spec(scheme, width))
            t = method.process_after_loading(method.quantize(w), torch.bfloat16, config.cpu_int_kernel)
            row[scheme] = rel(ops.quant_linear(method, x, t))
        out[name] = row
        del w, x, exact
    return out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from mixtral import LLM

    schemes = [s for s in args.schemes.split(",") if s]
    bad = [s for s in schemes if s not in (*SCHEMES, CALIBRATION)]
    if bad:
        raise ValueError(f"--schemes: {bad[0]!r} is not one of {', '.join((*SCHEMES, CALIBRATION))}")
    sets = {"synthetic_chats": chat_docs(args.chats)}
    if args.texts is not None:
        sets["texts"] = text_docs(args.texts)
    prompts = chat_prompts(args.prompts)
    kernels = KernelConfig(cpu_int_kernel=args.cpu_int_kernel)
    results: dict[str, Any] = {"model": args.model, "dtype": "bf16", "device": "cpu",
                               "cpu_int_kernel": args.cpu_int_kernel, "docs": {k: len(v) for k, v in sets.items()},
                               "prompts": len(prompts),
                               "max_tokens": args.max_tokens, "schemes": {}}
    ref_tokens: list[list[int]] = []
    for scheme in ["bf16", *schemes]:
        t0 = time.perf_counter()
        kwargs = {} if scheme in ("bf16", CALIBRATION) else {"quantization": scheme}
        dtype = "fp32" if scheme == CALIBRATION else "bf16"
        llm = LLM(args.model, device="cpu", dtype=dtype, kv_cache_bytes=2**28, kernels=kernels, **kwargs)
        model = llm.llm_engine.model
        row: dict[str, Any] = {"perplexity": {k: perplexity(model, v)[0] for k, v in sets.items()}}
        tokens = greedy(llm, prompts, args.max_tokens)
        llm.llm_engine.shutdown()
        if scheme == "bf16":
            ref_tokens = tokens
        else:
            row["greedy"] = agreement(ref_tokens, tokens)
            base = results["schemes"]["bf16"]["perplexity"]
            row["perplexity_change"] = {k: row["perplexity"][k] / base[k] - 1 for k in sets}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        results["schemes"][scheme] = row
        print(f"{scheme}: {json.dumps(row)}", file=sys.stderr)
    if not args.skip_layers:
        results["layers"] = layer_errors([s for s in schemes if s in SCHEMES], args.layer_scale, args.layer_tokens,
                                         kernels=kernels)
        results["layer_scale"] = args.layer_scale
    return results


def report(results: dict[str, Any]) -> str:
    """Markdown tables of the results (what docs/QUANTIZATION.md shows)."""
    sets = list(results["schemes"]["bf16"]["perplexity"])
    lines = ["| scheme | " + " | ".join(f"perplexity ({s})" for s in sets) + " | identical greedy outputs | "
             "tokens before first difference |", "|---" * (3 + len(sets)) + "|"]
    for scheme, row in results["schemes"].items():
        ppl = " | ".join(f"{row['perplexity'][s]:.3f}" + (f" ({100 * row['perplexity_change'][s]:+.2f}%)"
                                                            if "perplexity_change" in row else "") for s in sets)
        g = row.get("greedy")
        agree = f"{100 * g['identical_prompts']:.1f}% | {100 * g['tokens_before_first_difference']:.1f}%" if g \
            else "(reference) | (reference)"
        lines.append(f"| {scheme} | {ppl} | {agree} |")
    if "layers" in results:
        schemes = list(next(iter(results["layers"].values())))
        lines += ["", "| layer (8x7B shape / " + str(results["layer_scale"]) + ") | " + " | ".join(schemes) + " |",
                  "|---" * (1 + len(schemes)) + "|"]
        for layer, row in results["layers"].items():
            lines.append(f"| {layer} | " + " | ".join(f"{row[s]:.4f}" for s in schemes) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        results = measure(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"mixtral bench quality: {exc}", file=sys.stderr)
        return 2
    print(report(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mixtral.bench.quant_quality", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

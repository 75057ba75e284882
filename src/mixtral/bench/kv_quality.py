"""``python -m mixtral.bench.kv_quality``: what an FP8 KV cache (``--kv-cache-dtype fp8``) costs in quality.

Runs the engine on one model (default: the bundled demo, bf16) with the cache in the model's dtype, with FP8 at
scales 1.0 (the default), and with FP8 at per-layer scales from the K/V's largest magnitudes (what a
calibration would set), and reports:

1. held-out perplexity, from the engine's prompt logprobs (the paged attention reads the cache): fresh synthetic
   chats (seed 12345, never trained on; assistant tokens scored) and prose written for this tool (every token);
2. greedy agreement over 64 prompts (48 of those chats up to their last answer, 16 prose openings): outputs
   identical, the share of each output before the first differing token, and where outputs part, how close
   the baseline's top two choices were; a control run (the same weights computing in fp32) shows how often
   rounding anywhere parts them;
3. the model's K and V per layer: largest magnitude, share below e4m3's smallest normal at scale 1.0 (2^-6,
   where codes lose relative precision) and above 448 (saturated), rounding error at 1.0 and at the amax scale;
4. real-shaped random layers (Mixtral 8x7B and 8x22B attention: random weights at init std 0.02, RMS-normalised
   inputs): attention-output error against fp32 for the bf16 cache and FP8 at 1.0 / amax, with the stored K
   and V multiplied by 1/256 .. 256 (and q divided by the same, so the scores are unchanged): where scale 1.0
   starts to lose.

The amax scales are measured on the same held-out text they are scored on: an upper bound on what calibration
could give. docs/QUANTIZATION.md ("FP8 KV cache") holds the figures and reads them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from mixtral.kernels import kv_fp8
from mixtral.model.context import DenseContext, sdpa_gqa
from mixtral.quant.fp8 import FP8_MAX

# Prose for perplexity and prompts, written for this tool (the demo model was trained on fortunes and chats).
PROSE = [
    "The old lighthouse keeper counted the ships every evening and wrote their names in a blue notebook.",
    "Nobody in the village remembered who had planted the pear tree behind the station.",
    "When the rain stopped, the children ran outside to measure the puddles with their shoes.",
    "A good soup needs patience, a little salt, and someone waiting at the table.",
    "The train to the coast was late again, so the travellers shared oranges and stories.",
    "She kept every letter she received, but she never answered any of them.",
    "In winter the lake freezes so thick that the fishermen drive their trucks across it.",
    "My grandfather said that a map is only a promise that somebody once walked there.",
    "The library closes at six, but the cat that lives there stays up all night.",
    "If you listen carefully, the wind in the pines sounds like a distant crowd.",
    "The baker gives the last loaf of the day to whoever arrives first after closing time.",
    "Every spring the river brings new stones and takes away the old bridge's paint.",
    "Der Zug nach Norden fährt jeden Morgen um sieben, auch wenn niemand einsteigt.",
    "Im Garten meiner Tante wachsen mehr Tomaten, als die ganze Straße essen kann.",
    "Wer zu spät zum Frühstück kommt, bekommt nur noch kalten Kaffee und gute Ratschläge.",
    "Die Bibliothek im Dorf hat mehr Bücher über Katzen als über Geschichte.",
    "El mercado abre temprano y los vendedores cantan mientras ordenan la fruta.",
    "Mi vecino pinta su puerta de un color distinto cada verano.",
    "Cuando llueve en la ciudad, las calles huelen a pan recién hecho y a tierra mojada.",
    "La abuela guarda las llaves de toda la familia en una caja de galletas.",
    "Il treno per Roma era pieno di turisti e di ceste di pane.",
    "Mio zio racconta sempre la stessa storia, ma ogni volta il pesce diventa più grande.",
    "In piazza i bambini giocano a pallone finché le campane suonano mezzogiorno.",
    "La cucina della nonna profuma di basilico anche in pieno inverno.",
]
# Stored K/V multiplied by these in the real-shaped sweep (q divided by the same).
MULTIPLIERS = (1 / 256, 1 / 64, 1 / 16, 1.0, 16.0, 64.0, 256.0)
SUBNORMAL = 2.0 ** -6  # e4m3's smallest normal: below it a code has fewer significant bits


# A scored document: (kind, token ids, which positions are scored).
Doc = tuple[str, list[int], list[bool]]


def held_out(n_chats: int) -> tuple[list[Doc], list[tuple[str, list[int]]]]:
    """(scored documents, greedy prompts by kind). Chats ("chats") score their assistant tokens, prose ("prose")
    every token after <s>; prompts are the first 48 chats up to their last answer and 16 prose openings."""
    from mixtral.train.data import TARGET, Encoder
    from mixtral.train.synthetic import ConversationGenerator

    enc = Encoder("v3")
    docs: list[Doc] = []
    prompts: list[tuple[str, list[int]]] = []
    for chat in ConversationGenerator(12345, {"en": ["A new saying."]}, 0.7).generate(n_chats):
        ids, codes = enc.encode_chat(chat)
        docs.append(("chats", ids, [c == TARGET for c in codes]))
        last = max(i for i in range(1, len(codes)) if codes[i] == TARGET and codes[i - 1] != TARGET)
        if len(prompts) < 48:
            prompts.append(("chats", ids[:last]))
    for i, text in enumerate(PROSE):
        ids = enc.sp.encode(text, bos=True, eos=False)
        docs.append(("prose", ids, [False] + [True] * (len(ids) - 1)))
        if i < 16:
            prompts.append(("prose", ids[: max(4, len(ids) // 3)]))
    return docs, prompts


@torch.inference_mode()
def kv_stats(model: Any, docs: list[Doc]) -> list[dict[str, Any]]:
    """Per layer, over every token of ``docs``: the K and V figures of section 3 (K after RoPE, as stored)."""
    seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    class Capture(DenseContext):
        def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            seen.setdefault(layer_idx, []).append((k.float().cpu(), v.float().cpu()))
            return super().attend(layer_idx, q, k, v)

    for _, ids, _ in docs:
        model.forward_tokens(torch.tensor(ids, device=model.device), Capture(1, len(ids), model.device))
    rows = []
    for layer in sorted(seen):
        row: dict[str, Any] = {"layer": layer}
        for name, x in (("k", torch.cat([k for k, _ in seen[layer]])), ("v", torch.cat([v for _, v in seen[layer]]))):
            amax = x.abs().max().item()
            row[name] = {"amax": amax, "rms": x.pow(2).mean().sqrt().item(),
                         "below_2^-6": (x.abs() < SUBNORMAL).float().mean().item(),
                         "above_448": (x.abs() > FP8_MAX).float().mean().item(),
                         "rel_err_scale1": _round_err(x, 1.0),
                         "rel_err_amax": _round_err(x, kv_fp8.kv_scale_from_amax(amax))}
        rows.append(row)
    return rows


def _round_err(x: torch.Tensor, scale: float) -> float:
    """||dequant(quant(x)) - x|| / ||x||."""
    return ((kv_fp8.dequantize_kv(kv_fp8.quantize_kv(x, scale), scale) - x).norm() / x.norm()).item()


def engine_figures(model: Any, docs: list[Doc], prompts: list[tuple[str, list[int]]], max_tokens: int,
                   **engine_kwargs: Any) -> dict[str, Any]:
    """Perplexities (chats, prose) and greedy outputs of one engine configuration."""
    from mixtral import LLM, SamplingParams

    llm = LLM(model, max_model_len=model.args.max_seq_len, **engine_kwargs)
    outs = llm.generate([ids for _, ids, _ in docs], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    nll = {"chats": [0.0, 0], "prose": [0.0, 0]}
    for (kind, ids, scored), out in zip(docs, outs, strict=True):
        for i in range(1, len(ids)):
            if scored[i]:
                nll[kind][0] -= out.prompt_logprobs[i][ids[i]]  # type: ignore[index]
                nll[kind][1] += 1
    greedy = llm.generate([ids for _, ids in prompts],
                          SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=2), use_tqdm=False)
    llm.llm_engine.shutdown()
    return {"perplexity": {k: math.exp(s / n) for k, (s, n) in nll.items()},
            "tokens": {k: n for k, (_, n) in nll.items()},
            "kinds": [kind for kind, _ in prompts], "greedy": [o.outputs[0].token_ids for o in greedy],
            "top2": [[sorted(step.values(), reverse=True)[:2] for step in o.outputs[0].logprobs or []]
                     for o in greedy]}


def agreement(ref: dict[str, Any], got: dict[str, Any], kind: str | None = None) -> dict[str, float]:
    """Over the greedy outputs (of prompts of ``kind``, or all): identical outputs (share), the mean share of
    each reference output before the first difference, and the reference's lead of its first choice over its
    second (nats) where the outputs part: small leads mean the cache only flipped near-ties."""
    prefix, leads, same = [], [], 0
    rows = [i for i, k in enumerate(ref["kinds"]) if kind in (None, k)]
    for i in rows:
        a, b, top2 = ref["greedy"][i], got["greedy"][i], ref["top2"][i]
        if a == b:
            same += 1
            prefix.append(1.0)
            continue
        n = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        prefix.append(min(n / max(len(a), 1), 1.0))
        if n < len(top2) and len(top2[n]) == 2:
            leads.append(top2[n][0] - top2[n][1])
    leads.sort()
    return {"identical": same / len(rows), "shared_prefix": sum(prefix) / len(prefix),
            "parted": len(leads), "median_lead_where_parted": leads[len(leads) // 2] if leads else 0.0,
            "parted_below_0.5_nats": sum(x < 0.5 for x in leads) / len(leads) if leads else 0.0}


@torch.inference_mode()
def shape_sweep(name: str, tokens: int = 512, seed: int = 0) -> list[dict[str, float]]:
    """Section 4 for preset ``name``'s attention shape."""
    from mixtral.kernels.reference import rope_qk_reference
    from mixtral.model.layers import rope_cos_sin
    from mixtral.model.presets import preset

    args = preset(name)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, args.dim, generator=gen)
    x = x * x.pow(2).mean(-1, keepdim=True).rsqrt()  # [T, D], RMS 1 as after the attention norm
    q_size, kv_size = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    wqkv = torch.randn(q_size + 2 * kv_size, args.dim, generator=gen) * 0.02
    q, k, v = (x @ wqkv.T).split([q_size, kv_size, kv_size], dim=-1)
    q = q.view(tokens, args.n_heads, args.head_dim)  # [T, H, hd]
    k = k.view(tokens, args.n_kv_heads, args.head_dim)  # [T, KV, hd]
    v = v.view(tokens, args.n_kv_heads, args.head_dim)
    cos, sin = rope_cos_sin(torch.arange(tokens), args.head_dim, args.rope_theta, torch.float32)
    q, k = rope_qk_reference(q, k, cos, sin)

    def attend(qq: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor) -> torch.Tensor:
        heads = [t.transpose(0, 1)[None] for t in (qq, kk, vv)]  # [1, heads, T, hd]
        return sdpa_gqa(*heads, None, is_causal=True)[0]

    rows = []
    for m in MULTIPLIERS:
        km, vm, qm = k * m, v * m, q / m
        exact = attend(qm, km, vm)
        row = {"multiplier": m, "k_amax": km.abs().max().item(), "v_amax": vm.abs().max().item()}
        caches = {
            "bf16": (km.bfloat16().float(), vm.bfloat16().float()),
            "fp8_scale1": tuple(kv_fp8.dequantize_kv(kv_fp8.quantize_kv(t, 1.0), 1.0) for t in (km, vm)),
            "fp8_amax": tuple(kv_fp8.dequantize_kv(kv_fp8.quantize_kv(t, s), s)
                              for t, s in ((km, kv_fp8.kv_scale_from_amax(km.abs().max().item())),
                                           (vm, kv_fp8.kv_scale_from_amax(vm.abs().max().item())))),
        }
        for label, (kc, vc) in caches.items():
            out = attend(qm, kc, vc)
            row[label] = ((out - exact).norm() / exact.norm()).item()
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mixtral.bench.kv_quality", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo", help="model folder, preset or 'demo' (default: demo)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", default="bf16", help="model (and baseline KV cache) dtype (default: bf16)")
    p.add_argument("--chats", type=int, default=64, help="fresh synthetic chats scored (default: 64)")
    p.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per prompt (default: 32)")
    p.add_argument("--no-shapes", dest="shapes", action="store_false",
                   help="skip the real-shaped random layers (section 4)")
    p.add_argument("--no-control", dest="control", action="store_false",
                   help="skip the control run (the model computing in fp32, against the baseline)")
    p.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    args = p.parse_args(argv)

    from mixtral.checkpoint.loader import load_model, parse_dtype

    model = load_model(args.model, args.device, parse_dtype(args.dtype), progress=False).eval()
    docs, prompts = held_out(args.chats)
    stats = kv_stats(model, docs)
    amax_scales = [(kv_fp8.kv_scale_from_amax(r["k"]["amax"]), kv_fp8.kv_scale_from_amax(r["v"]["amax"]))
                   for r in stats]
    runs = {"auto": engine_figures(model, docs, prompts, args.max_tokens),
            "fp8": engine_figures(model, docs, prompts, args.max_tokens, kv_cache_dtype="fp8"),
            "fp8_amax": engine_figures(model, docs, prompts, args.max_tokens, kv_cache_dtype="fp8",
                                       kv_cache_scales=amax_scales)}
    if args.control and parse_dtype(args.dtype) != torch.float32:
        # Rounding elsewhere, for scale: the same weights computing in fp32 (cache included) against the baseline.
        fp32 = load_model(args.model, args.device, torch.float32, progress=False).eval()
        runs["fp32_model"] = engine_figures(fp32, docs, prompts, args.max_tokens)
    report: dict[str, Any] = {"model": args.model, "dtype": args.dtype, "device": args.device,
                              "prompts": len(prompts), "max_tokens": args.max_tokens, "kv": stats,
                              "amax_scales": amax_scales}
    base = runs["auto"]
    print(f"{args.model} ({args.dtype}, {args.device}); held-out tokens: chats {base['tokens']['chats']}, "
          f"prose {base['tokens']['prose']}; {len(prompts)} greedy prompts x {args.max_tokens} tokens")
    for name, run in runs.items():
        ppl = run["perplexity"]
        entry = {"perplexity": ppl, **({} if name == "auto" else agreement(base, run))}
        if name != "auto":
            entry["perplexity_change"] = {k: ppl[k] / base["perplexity"][k] - 1 for k in ppl}
            entry["greedy_by_kind"] = {k: agreement(base, run, k) for k in ("chats", "prose")}
        report[name] = entry
        line = f"  {name:10s} perplexity chats {ppl['chats']:.4f}, prose {ppl['prose']:.3f}"
        if name != "auto":
            ch = entry["perplexity_change"]
            kinds = entry["greedy_by_kind"]
            line += (f" ({ch['chats']:+.2%}, {ch['prose']:+.2%}); greedy identical {entry['identical']:.1%} "
                     f"(chats {kinds['chats']['identical']:.1%}, prose {kinds['prose']['identical']:.1%}), "
                     f"shared prefix {entry['shared_prefix']:.1%}; where parted ({entry['parted']}), the "
                     f"baseline's top-2 lead: median {entry['median_lead_where_parted']:.2f} nats, "
                     f"{entry['parted_below_0.5_nats']:.0%} below 0.5")
        print(line)
    print("K/V per layer (scale 1.0): amax, share < 2^-6, share > 448, rounding error at 1.0 / at amax scale")
    for r in stats:
        print(f"  layer {r['layer']}: " + "; ".join(
            f"{n.upper()} {r[n]['amax']:.3g}, {r[n]['below_2^-6']:.2%}, {r[n]['above_448']:.2%}, "
            f"{r[n]['rel_err_scale1']:.4f} / {r[n]['rel_err_amax']:.4f}" for n in ("k", "v")))
    if args.shapes:
        report["shapes"] = {}
        for name in ("mixtral-8x7b", "mixtral-8x22b"):
            rows = report["shapes"][name] = shape_sweep(name)
            print(f"{name} attention, 512 tokens: output error vs fp32 (bf16 / fp8 scale 1.0 / fp8 amax scale)")
            for r in rows:
                print(f"  K,V x {r['multiplier']:<9.4g} (|K| <= {r['k_amax']:.3g}, |V| <= {r['v_amax']:.3g}): "
                      f"{r['bf16']:.4f} / {r['fp8_scale1']:.4f} / {r['fp8_amax']:.4f}")
    if args.json:
        for run in runs.values():
            for key in ("kinds", "greedy", "top2"):
                run.pop(key)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

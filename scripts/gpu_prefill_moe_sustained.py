"""Prefill-MoE GEMM tiles against the tuned ones under sustained load (``--set persistent``: the persistent
kernels of ``persistent_moe.py``; ``--set tiles``: 256-row tiles; ``--set pair``: w2's short tiles spanning
two column tiles; ``--set joint``: w13's w1 and w3 tiles in one MMA): each candidate is a CUDA graph of
``--per-graph`` back-to-back launches, candidates alternate over rounds (order reversed every other round), so
clocks and power treat them alike. Checks every candidate's
output against the tuned kernel's first (rows unwritten would stay NaN).

    PYTHONPATH=src python3 scripts/gpu_prefill_moe_sustained.py --set tiles --tokens 2048,1024,4096 --json out.json \
        --emit cands.json --emit-table table.json

Both GEMMs share ``block_m`` and ``small_m`` (which a persistent GEMM ignores): every compatible w13 + w2 pair
is a combination.
``--emit`` writes the first token count's three best as ``gpu_prefill_tiles.py --candidates`` input,
``--emit-table`` the best per token count.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, replace

import torch

from mixtral.bench.cuda_timing import alternated_replays, capture
from mixtral.bench.tune_moe import random_experts
from mixtral.bench.tune_sorted_moe import sorted_inputs
from mixtral.kernels.triton import moe_configs
from mixtral.kernels.triton.moe_configs import GemmConfig, MoEConfig
from mixtral.kernels.triton.sorted_moe import invoke_w2, invoke_w13

Candidates = dict[str, tuple[int, int | None, GemmConfig]]  # label -> (block_m, small_m, tile)


def _p(bn: int, stages: int, ws: bool = False) -> GemmConfig:
    return GemmConfig(bn, 64, 8, stages, 1, ws, persistent=True)


def candidates(tuned: MoEConfig, which: str) -> tuple[Candidates, Candidates]:
    """(w13, w2) candidates: the tuned tiles and persistent ones, or other tile shapes. A persistent GEMM has no
    short last tiles, so its small_m is None: it combines with the other GEMM's at any small_m."""
    if which == "pair":  # w2's short tiles spanning two column tiles (GemmConfig.pair_small)
        return ({"tuned": (tuned.block_m, tuned.small_m, tuned.w13)},
                {"tuned": (tuned.block_m, tuned.small_m, tuned.w2),
                 "paired short tiles": (tuned.block_m, tuned.small_m, replace(tuned.w2, pair_small=True))})
    if which == "joint":  # w13's w1 and w3 tiles in one MMA of twice the width (GemmConfig.joint)
        t13 = tuned.w13
        plain = replace(t13, persistent=False)
        return ({"tuned": (tuned.block_m, tuned.small_m, t13),
                 "joint": (tuned.block_m, tuned.small_m, replace(plain, joint=True)),
                 "joint no ws": (tuned.block_m, tuned.small_m, replace(plain, joint=True, warp_specialize=False)),
                 "joint s3": (tuned.block_m, tuned.small_m, replace(plain, joint=True, num_stages=3)),
                 "P joint s4": (128, None, replace(_p(128, 4), joint=True)),
                 "P joint s4 ws": (128, None, replace(_p(128, 4, True), joint=True)),
                 "P s4": (128, None, _p(128, 4))},
                {"tuned": (tuned.block_m, tuned.small_m, tuned.w2)})
    if which == "tiles":
        return ({"tuned": (tuned.block_m, tuned.small_m, tuned.w13),
                 "bm256 64 s4": (256, 128, GemmConfig(64, 64, 8, 4)),
                 "P bm128 128 s4 ws": (128, None, _p(128, 4, True))},
                {"tuned": (tuned.block_m, tuned.small_m, tuned.w2),
                 "bm256 128 s4": (256, 128, GemmConfig(128, 64, 8, 4)),
                 "P bm64 256 s4": (64, None, _p(256, 4))})
    w13: Candidates = {
        "tuned": (tuned.block_m, tuned.small_m, tuned.w13),
        "P bm128 128 s4": (128, None, _p(128, 4)),
        "P bm128 128 s4 ws": (128, None, _p(128, 4, True)),
        "P bm128 128 s3": (128, None, _p(128, 3)),
        "P bm64 256 s3": (64, None, _p(256, 3)),
        "P bm64 256 s3 ws": (64, None, _p(256, 3, True)),
    }
    w2: Candidates = {
        "tuned": (tuned.block_m, tuned.small_m, tuned.w2),
        "bm128 256 s4 sm64": (128, 64, GemmConfig(256, 64, 8, 4)),
        "bm128 256 s4": (128, 0, GemmConfig(256, 64, 8, 4)),
        "P bm128 256 s4": (128, None, _p(256, 4)),
        "P bm128 256 s4 ws": (128, None, _p(256, 4, True)),
        "P bm128 256 s3": (128, None, _p(256, 3)),
        "P bm64 256 s4": (64, None, _p(256, 4)),
    }
    return w13, w2


def computed_rows(counts: list[int], block_m: int, small_m: int | None) -> int:
    """Rows the tiles multiply, padding included: whole ``block_m`` tiles, a group's short last block of at most
    ``small_m`` rows as a ``small_m`` tile (None: a persistent GEMM, no short tiles)."""
    total = 0
    for c in counts:
        rest = c % block_m
        last = 0 if rest == 0 else (small_m if small_m and rest <= small_m else block_m)
        total += c - rest + last
    return total


def time_gemm(gemm: str, cands: Candidates, run_one: Callable[[int, int, GemmConfig, torch.Tensor], None],
              out_cols: int, counts: list[int], flops: float, rounds: int, per_graph: int
              ) -> dict[str, dict[str, object]]:
    """Per candidate: median and best ms a launch, TFLOP/s of the useful rows and of the rows the tiles
    multiply (padding included), and the relative error against "tuned"."""
    rows = sum(counts)
    dev = torch.device("cuda")
    outs: dict[str, torch.Tensor] = {}
    graphs = {}
    for label, (bm, small, cfg) in cands.items():
        small = small or 0  # a persistent GEMM ignores it
        out = torch.full((rows, out_cols), float("nan"), device=dev, dtype=torch.bfloat16)
        try:
            run_one(bm, small, cfg, out)
            torch.cuda.synchronize()
        except Exception as exc:  # a tile this chip or compiler rejects
            print(f"{gemm} {label}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
            continue
        outs[label] = out.clone()
        graphs[label], _ = capture(lambda a=(bm, small, cfg, out): [run_one(*a) for _ in range(per_graph)])
    ref = outs["tuned"].float()
    times = {label: [ms / per_graph for ms in ts] for label, ts in alternated_replays(graphs, rounds).items()}
    report = {}
    for label, ts in times.items():
        o = outs[label]
        err = ((o.float() - ref).norm() / ref.norm()).item() if not o.isnan().any() else float("nan")
        med = statistics.median(ts)
        bm, small, cfg = cands[label]
        padded = computed_rows(counts, bm, small) / rows
        report[label] = {"block_m": bm, "small_m": small, "config": asdict(cfg), "median_ms": med,
                         "best_ms": min(ts), "TFLOPs": flops / med / 1e9, "computed_rows_ratio": padded,
                         "TFLOPs_computed": flops * padded / med / 1e9, "rel_err_vs_tuned": err}
        print(f"{gemm} {label:24s} bm {bm:3d} sm {small} {med * 1e3:8.1f} us {flops / med / 1e9:6.0f} TFLOP/s, "
              f"{flops * padded / med / 1e9:4.0f} computed ({padded - 1:.1%} padding; best {min(ts) * 1e3:7.1f} us) "
              f"err {err:.1e}", flush=True)
    return report


Report = dict[str, dict[str, object]]


def best_combos(r13: Report, r2: Report) -> list[tuple[float, str, MoEConfig]]:
    """Every error-free w13 + w2 pair that can share one MoEConfig (same block_m; small_m equal, or None on a
    persistent side), fastest first."""
    ok = lambda r: r["rel_err_vs_tuned"] == r["rel_err_vs_tuned"] and r["rel_err_vs_tuned"] < 1e-2  # noqa: E731
    combos = []
    for l13, a in r13.items():
        for l2, b in r2.items():
            if not (ok(a) and ok(b)) or a["block_m"] != b["block_m"]:
                continue
            smalls = {s for s in (a["small_m"], b["small_m"]) if s is not None}
            if len(smalls) > 1:
                continue
            cfg = MoEConfig(int(a["block_m"]), GemmConfig(**a["config"]), GemmConfig(**b["config"]),  # type: ignore[arg-type, call-overload]
                            int(smalls.pop()) if smalls else 0)  # type: ignore[call-overload]
            combos.append((float(a["median_ms"]) + float(b["median_ms"]), f"w13 {l13} + w2 {l2}", cfg))  # type: ignore[arg-type]
    return sorted(combos, key=lambda c: c[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", default="tiles", choices=["tiles", "persistent", "pair", "joint"], help="which candidates")
    ap.add_argument("--tokens", default="2048", help="comma-separated prefill token counts (pairs = 2x)")
    ap.add_argument("--rounds", type=int, default=7, help="alternated timing rounds")
    ap.add_argument("--per-graph", type=int, default=10, help="launches captured back to back per candidate")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--emit", default=None, help="write the best combinations at the first token count, for "
                                                 "gpu_prefill_tiles --candidates, here")
    ap.add_argument("--emit-table", default=None, help="write the best combination per token count here")
    args = ap.parse_args()
    dev = torch.device("cuda")
    e, f, d, k = 8, 14336, 4096, 2
    gen = torch.Generator(device=dev).manual_seed(0)
    w13, w2 = random_experts(e, f, d, torch.bfloat16, gen)
    results: dict[str, object] = {}
    table: dict[str, object] = {}
    for i, tokens in enumerate(int(t) for t in args.tokens.split(",")):
        xs, offs = sorted_inputs(tokens, e, d, k, torch.bfloat16, gen)  # [P, D], [E]
        p = xs.shape[0]
        act_in = torch.randn(p, f, device=dev, generator=gen, dtype=torch.bfloat16) * 0.1  # w2's input [P, F]
        tuned = moe_configs.get_sorted_config(e, f, d, tokens, torch.bfloat16, dev)
        c13, c2 = candidates(tuned, args.set)
        print(f"--- {tokens} tokens, tuned {tuned}", flush=True)
        def run13(bm: int, sm: int, c: GemmConfig, o: torch.Tensor, xs: torch.Tensor = xs,
                  offs: torch.Tensor = offs) -> None:
            invoke_w13(xs, w13, o, offs, bm, c, True, sm)

        def run2(bm: int, sm: int, c: GemmConfig, o: torch.Tensor, act: torch.Tensor = act_in,
                 offs: torch.Tensor = offs) -> None:
            invoke_w2(act, w2, o, offs, bm, c, True, sm)

        counts = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()  # rows per expert
        r13 = time_gemm("w13", c13, run13, f, counts, 4 * p * d * f, args.rounds, args.per_graph)
        r2 = time_gemm("w2", c2, run2, d, counts, 2 * p * d * f, args.rounds, args.per_graph)
        combos = best_combos(r13, r2)
        tuned_ms = float(r13["tuned"]["median_ms"]) + float(r2["tuned"]["median_ms"])
        for ms, label, cfg in combos[:6]:
            print(f"{tokens} combo {ms * 1e3:8.1f} us ({tuned_ms / ms - 1:+.1%} on tuned) {label}: {cfg}")
        results[str(tokens)] = {"w13": r13, "w2": r2, "tuned_ms": tuned_ms,
                                "combos": [{"ms": ms, "label": label, "config": cfg.to_dict()}
                                           for ms, label, cfg in combos]}
        if combos:
            table[str(tokens)] = combos[0][2].to_dict()
        if i == 0 and args.emit:
            with open(args.emit, "w") as fh:
                json.dump({f"{lab} (bm {c.block_m}, sm {c.small_m})": c.to_dict() for _, lab, c in combos[:3]}, fh,
                          indent=1)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, fh, indent=1)
    if args.emit_table:
        with open(args.emit_table, "w") as fh:
            json.dump(table, fh, indent=1)


if __name__ == "__main__":
    main()

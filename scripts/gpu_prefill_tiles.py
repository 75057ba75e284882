"""Prefill MoE tiles compared inside the engine, and the winner adopted into this GPU's table.

The last step of tuning the prefill MoE for a new GPU (docs/KERNELS.md, "Tuning tiles for a new GPU"): after
``python -m mixtral.bench.tune_sorted_moe`` has written this GPU's ``sorted_`` table from short bursts
of the GEMMs alone, this times whole prefills, where the board's power limit sets the clock. It captures one
prompt-prefill CUDA graph per candidate ``sorted_moe`` config and alternates them over rounds in one process,
so sustained clocks and power hit every candidate alike (the tuner's bursts ran ~10% faster than the same
kernels inside a 100 ms prefill). First every candidate's graph runs one prompt and its hidden states are
compared with the table entry's (``rel_err_vs_tuned``): a tile that leaves rows unwritten or mixes up operands
shows there before its time is trusted.

    PYTHONPATH=src python3 scripts/gpu_prefill_tiles.py --layers 32 --length 2048 --rounds 10 --adopt

Candidates: the table's entry at ``--length`` and variants of it, or the entry and the configs of
``--candidates FILE`` ({label: MoEConfig dict}). ``--adopt`` writes the winner into this GPU's ``sorted_`` table
at ``--length`` tokens (``mixtral.bench.tile_adoption``'s rule), with a note of the figures; without a clear
winner the table is left alone. Needs a CUDA GPU with room for ``--layers`` layers of the model in bf16.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch

from mixtral.bench import roofline
from mixtral.bench.tile_adoption import MIN_MEAN_GAIN, MIN_WIN_SHARE, adopt, adoption
from mixtral.engine.cuda_graphs import PrefillGraph
from mixtral.engine.llm_engine import LLMEngine
from mixtral.kernels.triton import moe_configs
from mixtral.kernels.triton.moe_configs import GemmConfig, MoEConfig
from mixtral.kernels.triton.sorted_moe import layout_problem
from mixtral.model.presets import PRESETS
from mixtral.sampling import SamplingParams


def prefill_engine(model: str, layers: int, length: int) -> LLMEngine:
    """The engine as ``mixtral bench gpu`` builds it (random weights, ``layers`` of the preset), one prompt of
    ``length`` tokens a chunk: its prefill graphs are captured for exactly that prompt."""
    name = f"{model}-{layers}l"
    PRESETS[name] = PRESETS[model].replace(n_layers=layers)
    return LLMEngine.from_config(name, device="cuda", dtype="bf16", max_model_len=length + 64, max_num_seqs=8,
                                 max_num_batched_tokens=length, enable_prefix_caching=False,
                                 gpu_memory_utilization=0.9)


def prefill_once(engine: LLMEngine, length: int, vocab: int, seed: int) -> float:
    """Seconds of one fresh prompt's prefill (prefix caching is off, every prompt differs)."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(100, vocab - 1, (length,), generator=gen).tolist()
    engine.add_request(f"p{seed}", prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def candidates(tuned: MoEConfig, extra: str | None = None) -> dict[str, MoEConfig]:
    """The tuned entry and variants of it the tuner ranked close (w13 with and without ``joint`` at 3 and 4
    stages where it is not persistent); or the tuned entry and the configs in the JSON file ``extra``
    ({label: MoEConfig dict})."""
    if extra:
        with open(extra) as fh:
            return {"tuned": tuned} | {label: MoEConfig.from_dict(c) for label, c in json.load(fh).items()}
    w13, w2 = tuned.w13, tuned.w2
    out = {
        "tuned": tuned,
        "small_m 32": MoEConfig(tuned.block_m, w13, w2, 32),
        "no small tile": MoEConfig(tuned.block_m, w13, w2, 0),
        "bm64 w13 256": MoEConfig(64, GemmConfig(256, 64, 8, 3), GemmConfig(256, 64, 8, 4), 0),
        "w13 3 stages, w2 ws": MoEConfig(tuned.block_m, GemmConfig(w13.block_n, w13.block_k, 8, 3, 1, True),
                                         GemmConfig(w2.block_n, w2.block_k, 8, 4, 1, True), tuned.small_m),
    }
    if not w13.persistent:  # one MMA for w1 and w3 (joint) or two: -1.8% inside 16-layer H100 prefills
        flip = "two MMAs" if w13.joint else "joint"
        for stages in (3, 4):
            out[f"w13 {flip}, {stages} stages"] = MoEConfig(
                tuned.block_m, replace(w13, joint=not w13.joint, num_stages=stages), w2, tuned.small_m)
    return out


@contextmanager
def sorted_config(cfg: MoEConfig) -> Iterator[None]:
    original: Callable[..., MoEConfig] = moe_configs.get_sorted_config
    moe_configs.get_sorted_config = lambda *a, **k: cfg  # type: ignore[assignment]
    try:
        yield
    finally:
        moe_configs.get_sorted_config = original  # type: ignore[assignment]


@torch.inference_mode()
def output_errors(graphs: dict[str, PrefillGraph], vocab: int) -> dict[str, float]:
    """Each graph's hidden states [N, D] for one random prompt against the first graph's (the tuned entry's):
    max |diff| / max |reference|. The graphs store no KV (their slots are -1), so replaying them directly
    changes nothing else; they share one memory pool, so each output is read before the next replay."""
    num_tokens = next(iter(graphs.values())).num_tokens
    ids = torch.randint(100, vocab - 1, (num_tokens,), generator=torch.Generator().manual_seed(7))  # [N]
    ref = None
    errors: dict[str, float] = {}
    for label, g in graphs.items():
        g.input_ids.copy_(ids)
        assert g.graph is not None and g.output is not None
        g.graph.replay()
        out = g.output.float()  # [N, D]
        if ref is None:
            ref = out.clone()
        errors[label] = float((out - ref).abs().max() / ref.abs().max())
    return errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mixtral-8x7b", help="preset (random weights)")
    ap.add_argument("--layers", type=int, default=32,
                    help="decoder layers kept (16 of 8x7B's 32 fit an 80 GB GPU, all 32 a 141 GB one)")
    ap.add_argument("--length", type=int, default=2048, help="prompt tokens (one chunk): the table entry tuned")
    ap.add_argument("--rounds", type=int, default=5, help="timed prefills per candidate")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--candidates", default=None, help="JSON {label: MoEConfig dict} to compare with the tuned entry")
    ap.add_argument("--adopt", action="store_true",
                    help=f"write the winner (mean >= {MIN_MEAN_GAIN * 100:.1f}%% shorter, faster in >= "
                         f"{MIN_WIN_SHARE * 100:.0f}%% of rounds, same hidden states) into this GPU's sorted_ table "
                         "at --length")
    args = ap.parse_args()
    engine = prefill_engine(args.model, args.layers, args.length)
    flops = roofline.prefill_flops(engine.model_args, args.length)
    peak = roofline.datasheet_peak(torch.cuda.get_device_name()) or roofline.measure_matmul_flops(torch.device("cuda"))
    runner = engine.model_runner
    margs = engine.model_args
    assert runner.prefill_graph is not None, "needs the prefill graphs (CUDA, graphs on)"
    dev = torch.device("cuda")
    tuned = moe_configs.get_sorted_config(margs.num_experts, margs.hidden_dim, margs.dim, args.length,
                                          torch.bfloat16, dev)
    graphs: dict[str, PrefillGraph] = {}
    ff = runner.model.layers[0].feed_forward
    probe = torch.empty(1, margs.dim, dtype=torch.bfloat16, device=dev)
    cands = candidates(tuned, args.candidates)
    for label, cfg in cands.items():
        problem = layout_problem(probe, ff.w13, ff.w2, cfg)
        if problem is not None:  # sorted_moe would not take it: the graph would time another path
            print(f"{label}: skipped, {problem}")
            continue
        with sorted_config(cfg):
            g = PrefillGraph(runner.model, runner.kv_caches, args.length, runner.max_blocks_per_seq,
                             runner.config.max_model_len, runner.expert_counts_buf, fresh=True)
            try:
                g.capture(pool=runner.prefill_graph.pool)
            except Exception as exc:  # a tile the chip cannot run
                print(f"{label}: capture failed: {type(exc).__name__}: {str(exc)[:200]}")
                continue
        graphs[label] = g
        print(f"captured {label}: {cfg}", flush=True)
    errors = output_errors(graphs, margs.vocab_size)
    for label, err in errors.items():
        print(f"{label}: hidden states vs tuned, max relative error {err:.2e}")
    times: dict[str, list[float]] = {k: [] for k in graphs}
    seed = 0
    for label in graphs:  # warm-up
        runner.fresh_prefill_graph = graphs[label]
        prefill_once(engine, args.length, margs.vocab_size, seed := seed + 1)
    order = list(graphs)
    for r in range(args.rounds):
        for label in order if r % 2 == 0 else order[::-1]:
            runner.fresh_prefill_graph = graphs[label]
            t = prefill_once(engine, args.length, margs.vocab_size, seed := seed + 1)
            times[label].append(t)
            print(f"round {r} {label:22s} {t * 1e3:7.2f} ms {flops / t / peak:6.1%}", flush=True)
    summary = {}
    for label, ts in times.items():
        med = statistics.median(ts)
        summary[label] = {"config": cands[label].to_dict(), "median_ms": med * 1e3,
                          "fraction_of_peak_median": flops / med / peak,
                          "fraction_of_peak_best": flops / min(ts) / peak, "rel_err_vs_tuned": errors[label]}
        print(f"{label:22s} median {med * 1e3:7.2f} ms {flops / med / peak:6.1%} best {flops / min(ts) / peak:6.1%}")
    if args.adopt:
        runs_ms = {k: [t * 1e3 for t in v] for k, v in times.items()}
        label, reasons = adoption(runs_ms, errors)
        print("\n".join(reasons))
        if label is None:
            print(f"no candidate beat the table's entry at {args.length} tokens: table left alone")
        else:
            gpu = torch.cuda.get_device_name()
            table = moe_configs.config_path(margs.num_experts, margs.hidden_dim, margs.dim, gpu, "sorted_")
            adopt(table, args.length, label, cands[label], reasons, gpu, args.layers)
            print(f"adopted {label} at {args.length} tokens into {table}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "layers": args.layers, "summary": summary,
                       "runs_ms": {k: [t * 1e3 for t in v] for k, v in times.items()}}, fh, indent=1)


if __name__ == "__main__":
    main()

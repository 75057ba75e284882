"""``mixtral bench``: one sub-subcommand per benchmark, each in its own module under ``mixtral.bench``."""

from __future__ import annotations

import argparse
import importlib

# name -> (module under mixtral.bench, one-line help)
BENCHMARKS = {
    "throughput": ("throughput", "offline engine throughput, TTFT and ITL over N requests"),
    "gpu": ("gpu", "GPU decode/prefill speed on real shapes against the bandwidth/FLOP roofline and peers"),
    "serve": ("serve", "HTTP load against a running `mixtral serve`: throughput, TTFT, ITL, server overhead"),
    "quality": ("quant_quality", "what fp8 / int8 / int4 cost in quality: perplexity, greedy agreement, layer error"),
}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="run a benchmark", description="Benchmarks. See each one's --help.")
    bsub = p.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        module = importlib.import_module(f"mixtral.bench.{module_name}")
        bp = bsub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(bp)
        bp.set_defaults(_bench_run=module.run)
    return p


def run(args: argparse.Namespace) -> int:
    return int(args._bench_run(args) or 0)

"""``mixtral routing PROMPTS``: which experts a model routes a file of prompts to, as a JSON report and a PNG.

Runs the model directly (no engine, no server): one forward per prompt, each MoE layer's router output captured
(``mixtral.analysis``). Prints a per-layer summary and each label's preferred experts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mixtral.defaults import DEFAULT_MODEL


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "routing",
        help="analyse which experts a file of prompts is routed to (JSON + PNG report)",
        description="Run every prompt of PROMPTS (JSONL: one {\"prompt\" | \"text\" | \"messages\", \"label\"?} "
                    "object per line) through MODEL, capture each MoE layer's top-k experts for every token, and "
                    "write routing_report.json and routing_report.png to --output-dir: per-layer expert load and "
                    "its imbalance, top-k co-occurrence, routing entropy, and the experts each label prefers.",
    )
    p.add_argument("prompts", type=Path, metavar="PROMPTS", help="JSONL file of prompts (optional 'label' each)")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="MODEL",
                   help=f"model folder, preset, Hugging Face repo id or 'demo' (default: {DEFAULT_MODEL})")
    p.add_argument("--output-dir", type=Path, default=Path("routing_report"), metavar="DIR",
                   help="where routing_report.json and routing_report.png go (created; default: ./routing_report)")
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="torch device, e.g. 'cuda', 'cpu' (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"],
                   help="weight and activation dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--max-tokens-per-prompt", type=int, default=2048, metavar="N",
                   help="use only the first N tokens of each prompt (default: 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights (presets) (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    from mixtral.analysis.routing_capture import read_prompts

    if args.max_tokens_per_prompt < 1:
        print(f"mixtral routing: --max-tokens-per-prompt must be >= 1, got {args.max_tokens_per_prompt}",
              file=sys.stderr)
        return 2
    try:
        specs = read_prompts(args.prompts)
    except (ValueError, FileNotFoundError) as exc:
        print(f"mixtral routing: {exc}", file=sys.stderr)
        return 2
    from mixtral.engine.loading import load_for_engine

    try:
        model, tokenizer, name = load_for_engine(args.model, args.device, args.dtype, seed=args.seed)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"mixtral routing: cannot load {args.model!r}: {exc}", file=sys.stderr)
        return 1
    try:
        report = _route_all(model, tokenizer, specs, args.max_tokens_per_prompt, not args.no_progress)
    except ValueError as exc:
        print(f"mixtral routing: {exc}", file=sys.stderr)
        return 1
    from mixtral.analysis.routing_plots import write_report_png

    args.output_dir.mkdir(parents=True, exist_ok=True)
    data = {"model": name, "prompts_file": str(args.prompts), **report.to_json()}
    json_path = args.output_dir / "routing_report.json"
    json_path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    png_path = write_report_png(report, args.output_dir / "routing_report.png",
                                title=f"{name}: routing of {report.num_prompts} prompts, {report.num_tokens} tokens")
    _print_summary(data)
    print(f"wrote {json_path} and {png_path}")
    return 0


def _route_all(model: Any, tokenizer: Any, specs: list[Any], max_tokens: int, progress: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mixtral.analysis.routing_capture import route_prompt
    from mixtral.analysis.routing_stats import RoutingReport

    args = model.args
    report = RoutingReport(args.n_layers, args.num_experts, args.num_experts_per_tok)
    console = Console(stderr=True)
    bar = Progress(TextColumn("routing"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[tokens]} tokens"),
                   TimeElapsedColumn(), console=console, disable=not progress)
    with bar:
        task = bar.add_task("routing", total=len(specs), tokens=0)
        for spec in specs:
            report.add(route_prompt(model, tokenizer, spec, max_tokens))  # the arrays are not kept: memory stays flat
            bar.update(task, advance=1, tokens=report.num_tokens)
    return report


def _print_summary(data: dict[str, Any]) -> None:
    print(f"{data['model']}: {data['num_prompts']} prompts, {data['num_tokens']} tokens, {data['num_layers']} layers, "
          f"top-{data['top_k']} of {data['num_experts']} experts")
    print(f"{'layer':>5} {'max/mean':>8} {'cv':>6} {'router H':>9} {'load H':>7}  most frequent pair")
    for layer in data["layers"]:
        pair = layer["top_pairs"][0] if layer["top_pairs"] else None
        pair_text = f"{pair['experts']} in {pair['share_of_tokens']:.0%} of tokens" if pair else "-"
        print(f"{layer['layer']:>5} {layer['imbalance']:>8.2f} {layer['cv']:>6.2f} "
              f"{layer['token_entropy_normalized']:>9.2f} {layer['load_entropy_normalized']:>7.2f}  {pair_text}")
    for label, summary in data["labels"].items():
        strongest = ", ".join(f"L{s['layer']}/e{s['expert']} x{s['lift']:.2f}" for s in summary["strongest"][:3])
        print(f"label {label!r} ({summary['prompts']} prompts, {summary['tokens']} tokens): prefers {strongest}; "
              f"most label-dependent layer {summary['most_label_dependent_layer']}")

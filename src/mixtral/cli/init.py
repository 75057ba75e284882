"""``mixtral init --preset NAME --format hf|mistral OUT``: write a random-weight checkpoint (tests, benchmarks).

The weights equal ``mixtral.load_model(NAME, seed=SEED)`` on CPU (cast to ``--dtype``); they are generated
one parameter at a time, so even the full-size presets are written without holding the model in memory.
"""

from __future__ import annotations

import argparse

from mixtral.cli.convert import add_common_write_flags, prepare_output, report_errors


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from mixtral.model.presets import PRESETS

    p = sub.add_parser(
        "init", help="write a random-weight checkpoint of a preset",
        description="Write a checkpoint with reproducible random weights for a preset's shapes, plus the "
                    "preset's tokenizer file (from mistral-common). For tests and benchmarks: the model "
                    "produces noise.",
    )
    p.add_argument("out", metavar="OUT", help="folder to write (created)")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS), help="model shapes and tokenizer")
    p.add_argument("--format", choices=("hf", "mistral"), default="hf",
                   help="'hf' (config.json + model*.safetensors) or 'mistral' (params.json + "
                        "consolidated.safetensors); default hf")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    p.add_argument("--std", type=float, default=0.02,
                   help="standard deviation of the normal weights (norms are 1); default 0.02")
    add_common_write_flags(p)
    return p


@report_errors
def run(args: argparse.Namespace) -> int:
    from mixtral.checkpoint.loader import parse_dtype
    from mixtral.checkpoint.writer import RandomSource, write_checkpoint
    from mixtral.model.presets import preset

    model_args = preset(args.preset)
    prepare_output(args.out, args.overwrite)
    dtype = parse_dtype(args.dtype or "bf16")
    out = write_checkpoint(RandomSource(model_args, args.seed, args.std), model_args, args.out, args.format, dtype,
                           max_shard_bytes=args.max_shard_size, progress=args.progress)
    print(f"wrote random {args.preset} ({args.format}, {args.dtype or 'bf16'}) to {out}")
    return 0

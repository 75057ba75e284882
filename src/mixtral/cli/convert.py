"""``mixtral convert SRC DST --to hf|mistral|gguf``: rewrite a checkpoint in the other (or the same) format, or as a
GGUF file llama.cpp runs (checkpoint/gguf_writer.py)."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

from mixtral.checkpoint.gguf_writer import GGUF_WRITE_TYPES

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500MiB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 5GB, 500MiB, 1000000)")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])


# What a checkpoint folder holds; --overwrite removes these (and nothing else) before writing.
CHECKPOINT_GLOBS = ("config.json", "params.json", "*.safetensors", "*.index.json", "tokenizer.model*", "*.bin",
                    "*.pth", "*.pt")


def prepare_output(folder: str | Path, overwrite: bool) -> None:
    """Refuse to mix a new checkpoint with an old one in ``folder`` unless ``overwrite``, then clear the old."""
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ValueError(f"output {folder} exists and is not a folder")
    old = sorted({p for pattern in CHECKPOINT_GLOBS for p in folder.glob(pattern) if p.is_file()})
    if old and not overwrite:
        raise ValueError(f"{folder} already holds a checkpoint ({', '.join(p.name for p in old[:4])}"
                         f"{', ...' if len(old) > 4 else ''}); pass --overwrite to replace it")
    for path in old:
        path.unlink()


def report_errors(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Decorate a subcommand's ``run``: a checkpoint, config or argument error becomes one line on stderr and
    exit status 1 instead of a traceback."""
    def wrapped(args: argparse.Namespace) -> int:
        from mixtral.checkpoint.errors import CheckpointError
        from mixtral.model.args import ConfigError

        try:
            return run(args)
        except (CheckpointError, ConfigError, ValueError, FileNotFoundError) as exc:
            print(f"mixtral {args.command}: error: {exc}", file=sys.stderr)
            return 1

    wrapped.__doc__ = run.__doc__
    return wrapped


def add_common_write_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by `convert` and `init`."""
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="cast every tensor to this dtype (default: convert keeps the source's dtypes; "
                        "init writes bf16)")
    p.add_argument("--max-shard-size", type=parse_size, default="5GB", metavar="SIZE",
                   help="largest Hugging Face shard file, e.g. 5GB or 500MiB (default 5GB); ignored for mistral")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar (default: when stderr is a terminal)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a checkpoint already in the output folder (default: refuse)")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "convert", help="convert a checkpoint between Hugging Face and Mistral consolidated formats, or to GGUF",
        description="Convert a checkpoint between the Hugging Face format (config.json + model*.safetensors) "
                    "and Mistral's consolidated format (params.json + consolidated.safetensors), or write it as one "
                    "GGUF file for llama.cpp (--to gguf --gguf-type ...). Tensors stream one at a time, so host "
                    "memory stays near the largest tensor.",
    )
    p.add_argument("src", metavar="SRC",
                   help="source model: a folder (either format), a Hugging Face repo id, or a preset name")
    p.add_argument("dst", metavar="DST",
                   help="destination folder (created; must differ from SRC), or with --to gguf a file ending in .gguf")
    p.add_argument("--to", choices=("hf", "mistral", "gguf"), required=True,
                   help="format to write: 'hf' (Hugging Face, loadable by transformers), 'mistral' (consolidated) or "
                        "'gguf' (one file for llama.cpp; needs --gguf-type)")
    p.add_argument("--gguf-type", choices=GGUF_WRITE_TYPES, default=None,
                   help="with --to gguf: the type of the attention projections and experts (q8_0, q5_1, q5_0, q4_1, "
                        "q4_0: llama.cpp's blocks of 32, rounded as llama.cpp rounds) or of every matrix (f32, f16, "
                        "bf16); the embeddings and lm_head stay float (--dtype), norms and router F32")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow reading pickle .bin/.pt/.pth source files (only for sources you trust)")
    p.add_argument("--quantization", choices=("fp8",), default=None,
                   help="write the attention projections and experts as FP8 in the compressed-tensors "
                        "'float-quantized' layout (e4m3 weights, one scale per output channel, activations "
                        "quantized per token at run time), which vLLM and SGLang load too; the router, "
                        "embeddings, norms and lm_head keep --dtype. Needs --to hf (default: no quantization)")
    add_common_write_flags(p)
    return p


@report_errors
def run(args: argparse.Namespace) -> int:
    from mixtral.checkpoint.loader import parse_dtype, resolve
    from mixtral.checkpoint.writer import convert_checkpoint

    if args.to == "gguf" or getattr(args, "gguf_type", None) is not None:
        return _run_gguf(args)

    source = resolve(args.src)  # a bad source fails before the output folder is touched
    if source.folder is not None and Path(args.dst).resolve() == source.folder.resolve():
        raise ValueError(f"destination {args.dst} is the source folder; write the conversion somewhere else")
    if getattr(args, "quantization", None) is not None and args.to != "hf":
        raise ValueError("--quantization fp8 writes the Hugging Face layout: pass --to hf")
    prepare_output(args.dst, args.overwrite)
    dtype = parse_dtype(args.dtype) if args.dtype else None
    out = convert_checkpoint(args.src, args.dst, args.to, dtype, allow_pickle=args.allow_pickle,
                             max_shard_bytes=args.max_shard_size, progress=args.progress,
                             quantization=getattr(args, "quantization", None))
    print(f"wrote {args.to} checkpoint to {out}")
    return 0


def _run_gguf(args: argparse.Namespace) -> int:
    """``--to gguf``: one file, refused when it exists (unless --overwrite) or is not named .gguf."""
    from mixtral.checkpoint.gguf_writer import convert_to_gguf
    from mixtral.checkpoint.loader import parse_dtype

    if args.to != "gguf":
        raise ValueError(f"--gguf-type applies to --to gguf, not --to {args.to}")
    if args.gguf_type is None:
        raise ValueError(f"--to gguf needs --gguf-type, one of {', '.join(GGUF_WRITE_TYPES)}")
    if getattr(args, "quantization", None) is not None:
        raise ValueError("--quantization writes the Hugging Face layout; a GGUF file takes --gguf-type")
    dst = Path(args.dst)
    if dst.suffix != ".gguf":
        raise ValueError(f"--to gguf writes one file: name it *.gguf, got {dst}")
    if dst.exists() and not args.overwrite:
        raise ValueError(f"{dst} already exists; pass --overwrite to replace it")
    dtype = parse_dtype(args.dtype) if args.dtype else None
    out = convert_to_gguf(args.src, dst, args.gguf_type, dtype, allow_pickle=args.allow_pickle,
                          progress=args.progress)
    print(f"wrote {args.gguf_type} GGUF file {out}")
    return 0

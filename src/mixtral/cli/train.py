"""``mixtral train``: fine-tune (full or LoRA) or train from scratch a Mixtral model on chat/text data."""

from __future__ import annotations

import argparse
import json
import sys

from mixtral.cli.kernel_args import add_kernel_args, kernel_config_from_args
from mixtral.train.lora import TARGETS


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="fine-tune a Mixtral model (full or LoRA) on chat or text data",
        description="Train a Mixtral model with the router load-balancing loss. Data: .jsonl files of chats "
                    "({'messages': [...], 'tools': [...]}: loss on assistant turns and tool calls only) or "
                    "texts ({'text': ...}), .txt files, or a packed .safetensors from --save-dataset.",
    )
    src = p.add_argument_group("what to train (exactly one)")
    src.add_argument("--model", help="model to start from: a checkpoint folder (Hugging Face or Mistral format), "
                     "'demo', or a Hugging Face repo id")
    src.add_argument("--preset", help="start from random weights of a named preset (e.g. tiny)")
    src.add_argument("--model-config", help="start from random weights of this config.json or params.json")
    d = p.add_argument_group("data")
    d.add_argument("--data", nargs="+", required=True, metavar="FILE", help="training files (.jsonl, .txt, "
                   "packed .safetensors)")
    d.add_argument("--tokenizer", help="mistral-common tokenizer for .jsonl/.txt: v1, v3 or a tokenizer file "
                   "(default: the model's own)")
    d.add_argument("--seq-len", type=int, default=512, help="tokens per packed window (default: 512)")
    d.add_argument("--eval-fraction", type=float, default=0.02, help="share of windows held out for "
                   "perplexity (default: 0.02; 0 = none)")
    d.add_argument("--save-dataset", metavar="FILE", help="also write the encoded, packed data to this "
                   ".safetensors (train elsewhere without mistral-common)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--max-steps", type=int, default=100, help="optimizer steps (default: 100; 0 = only "
                   "prepare data and export)")
    o.add_argument("--batch-size", type=int, default=8, help="windows per micro-batch (default: 8)")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    o.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default: 3e-4)")
    o.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a share of the peak after "
                   "cosine decay (default: 0.1)")
    o.add_argument("--warmup-steps", type=int, default=10, help="linear warm-up steps (default: 10)")
    o.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices (default: 0.1)")
    o.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (default: 1.0; "
                   "0 = off)")
    o.add_argument("--aux-loss-coef", type=float, help="load-balancing loss weight (default: the model "
                   "config's router_aux_loss_coef)")
    o.add_argument("--z-loss-coef", type=float, default=0.0, help="router z-loss weight (default: 0 = off)")
    o.add_argument("--router-jitter", type=float, default=0.0, help="multiply router inputs by U(1-j, 1+j) "
                   "while training (default: 0)")
    o.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in fp32 (default: bf16 autocast)")
    o.add_argument("--gradient-checkpointing", action="store_true", help="recompute blocks in backward to "
                   "save memory")
    o.add_argument("--seed", type=int, default=0, help="seed for init, data order and jitter (default: 0)")
    o.add_argument("--init-std", type=float, default=0.02, help="std of random init (fresh models only; default: 0.02)")
    o.add_argument("--device", default="auto", help="cuda, cpu or auto (default: auto)")
    o.add_argument("--time-limit-minutes", type=float, help="stop, checkpoint and export after this long")
    lo = p.add_argument_group("LoRA")
    lo.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank instead of "
                    "all weights (default: 0 = full fine-tuning)")
    lo.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale numerator (default: 16)")
    lo.add_argument("--lora-targets", nargs="+", default=list(TARGETS), choices=list(TARGETS),
                    help="projections that get adapters (default: all)")
    lo.add_argument("--merge-lora", action="store_true", help="also export base + adapter merged to "
                    "OUTPUT/model")
    s = p.add_argument_group("output")
    s.add_argument("--output-dir", "-o", required=True, help="folder for checkpoints, metrics and the "
                   "final model")
    s.add_argument("--save-every", type=int, default=0, help="write a resumable checkpoint every N steps "
                   "(default: 0, only at a --time-limit-minutes stop)")
    s.add_argument("--eval-every", type=int, default=0, help="held-out perplexity every N steps (default: 0, only "
                   "at the end)")
    s.add_argument("--log-every", type=int, default=10, help="log metrics every N steps (default: 10)")
    s.add_argument("--resume", help="checkpoint folder to resume from, or 'latest' in --output-dir")
    s.add_argument("--save-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the exported model (default: bfloat16)")
    s.add_argument("--max-shard-mb", type=float, help="split exported weights into shards of at "
                   "most this many MiB (default: 5 GiB shards)")
    s.add_argument("--no-heatmap", dest="heatmap", action="store_false", help="skip the expert-load PNG")
    s.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar or log lines")
    add_kernel_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    from mixtral.train.config import TrainConfig
    from mixtral.train.trainer import train

    fields = set(TrainConfig.__dataclass_fields__) - {"extra"}
    try:
        cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields}, kernels=kernel_config_from_args(args))
        result = train(cfg)
    except (ValueError, FileNotFoundError) as exc:  # bad flags, data, model or checkpoint: ConfigError too
        print(f"mixtral train: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"steps": len(result.steps), "eval_loss": result.eval_loss,
                      "eval_perplexity": result.eval_perplexity,
                      "model": str(result.model_dir) if result.model_dir else None,
                      "adapter": str(result.adapter_dir) if result.adapter_dir else None}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m mixtral.cli.train ...``: the same command without loading the other subcommands."""
    parser = argparse.ArgumentParser(prog="mixtral")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["train", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    sys.exit(main())

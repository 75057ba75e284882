"""Entry point of the ``mixtral`` command: builds the parser from one module per subcommand.

Each subcommand module exposes ``add_parser(subparsers)`` (registering its flags, with help for each)
and ``run(args) -> int``. Modules are imported only when the parser is built, so ``mixtral --help`` does
not pay for the server or the kernels.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand name -> module under mixtral.cli, in the order --help lists them.
COMMANDS = ("generate", "chat", "serve", "bench", "train", "convert", "init", "info")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixtral",
        description="Self-hosted inference, serving and fine-tuning for Mistral's Mixtral models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"mixtral.cli.{name}")
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

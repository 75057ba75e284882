"""Entry point of the ``mixtral`` command: builds the parser from one module per subcommand.

Each subcommand module exposes ``add_parser(subparsers)`` (registering its flags, with help for each)
and ``run(args) -> int``. Only the named subcommand's module is imported (all of them for ``mixtral --help``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand name -> module under mixtral.cli, in the order --help lists them.
COMMANDS = ("generate", "chat", "serve", "bench", "train", "convert", "init", "info", "routing")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or (``only``) one with just that subcommand: running ``mixtral chat`` should not
    import the server or the kernels, nor fail because an unrelated subcommand cannot import."""
    parser = argparse.ArgumentParser(
        prog="mixtral",
        description="Self-hosted inference, serving and fine-tuning for Mistral's Mixtral models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS if only is None else (only,):
        module = importlib.import_module(f"mixtral.cli.{name}")
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(first if first in COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into `head` and closed early: not an error. Point stdout at devnull so the
        # interpreter's final flush does not raise again.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())

"""Entry point of the ``mixtral`` command: builds the parser from one module per subcommand.

Each subcommand module exposes ``add_parser(subparsers)`` (registering its flags, with help for each)
and ``run(args) -> int``. Only the named subcommand's module is imported (all of them for ``mixtral --help``).
An unknown flag is reported by the subcommand's own parser (its usage line, not the top-level one).
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
    from mixtral import __version__

    parser = argparse.ArgumentParser(
        prog="mixtral",
        description="Self-hosted inference, serving and fine-tuning for Mistral's Mixtral models.",
    )
    parser.add_argument("--version", action="version",
                        version=f"mixtral {__version__} (python {sys.version.split()[0]})",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS if only is None else (only,):
        module = importlib.import_module(f"mixtral.cli.{name}")
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run, _parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(first if first in COMMANDS else None)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # The subcommand's parser says it, with its own usage line (`mixtral serve --unknown`); exits with 2.
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
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

"""``mixtral chat``: an interactive conversation with the model on its official chat template.

Each line read from stdin is one user message. The whole conversation is encoded with
``llm.tokenizer.encode_chat`` (mistral-common's template for the model's tokenizer) and the reply is streamed
to stdout. ``/reset`` forgets the conversation (keeping --system), ``/exit``, ``/quit`` or end of input quit.
Reading plain lines from stdin makes it scriptable: ``printf 'Hi\\n/exit\\n' | mixtral chat``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from mixtral.cli.generate import (
    add_model_arguments,
    add_sampling_arguments,
    load_or_report,
    read_stdin,
    sampling_params,
    stream_text,
)

HELP_TEXT = "Type a message and press Enter. Commands: /reset (forget the conversation), /exit (quit), /help."


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "chat",
        help="interactive chat on the model's chat template, streaming replies",
        description="Chat with the model. Each input line is a user message; the reply streams to stdout. "
                    "Commands: /reset forgets the conversation (the --system prompt stays), /exit or /quit "
                    "(or end of input, Ctrl-D) quits, /help lists them. Ctrl-C interrupts a reply.",
    )
    add_model_arguments(p)
    p.add_argument("--system", default=None, metavar="TEXT",
                   help="system prompt placed at the start of the conversation (default: none)")
    add_sampling_arguments(p, max_tokens=512)
    return p


class ChatSession:
    """The conversation so far and one turn of it; separate from the terminal so it can be driven by tests."""

    def __init__(self, llm: Any, params: Any, system: str | None = None) -> None:
        self.llm = llm
        self.params = params
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def turn(self, user_text: str, out: TextIO, err: TextIO) -> str | None:
        """Add a user message, stream the reply to ``out``; return it (None when the turn failed and was undone)."""
        from mixtral.tokenizer import ChatEncodingError

        self.messages.append({"role": "user", "content": user_text})
        try:
            prompt_ids = self.llm.tokenizer.encode_chat(self.messages)
            reply, finish_reason = stream_text(self.llm, prompt_ids, self.params, out, strip_leading_space=True)
        except (ChatEncodingError, ValueError) as exc:
            self.messages.pop()
            err.write(f"error: {exc} (the message was not added; /reset starts over)\n")
            return None
        except KeyboardInterrupt:
            self.messages.pop()  # an interrupted reply is not part of the conversation
            out.write("\n")
            err.write("(interrupted)\n")
            return None
        out.write("\n")
        out.flush()
        if not reply.strip():
            # mistral-common refuses an empty assistant message, so an empty reply cannot stay in the history
            self.messages.pop()
            err.write("(the model gave an empty reply; message dropped from the conversation)\n")
            return reply
        self.messages.append({"role": "assistant", "content": reply})
        if finish_reason == "length":
            err.write(f"(reply cut at --max-tokens {self.params.max_tokens})\n")
        return reply


def read_line(interactive: bool) -> str | None:
    """One input line without its newline; None at end of input."""
    if interactive:
        try:
            return input(">>> ")
        except EOFError:
            return None
    line = read_stdin(sys.stdin, line=True)
    return None if line == "" else line.rstrip("\r\n")


def run(args: argparse.Namespace) -> int:
    try:
        params = sampling_params(args)
    except ValueError as exc:
        print(f"mixtral chat: {exc}", file=sys.stderr)
        return 2
    llm = load_or_report(args, "chat")
    if llm is None:
        return 1
    session = ChatSession(llm, params, system=args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(HELP_TEXT, file=sys.stderr)
    while True:
        line = read_line(interactive)
        if line is None:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text == "/help":
            print(HELP_TEXT, file=sys.stderr)
            continue
        if text.startswith("/") and " " not in text:
            print(f"unknown command {text!r}. {HELP_TEXT}", file=sys.stderr)
            continue
        session.turn(line, sys.stdout, sys.stderr)
    if interactive:
        print(file=sys.stderr)
    return 0

"""``mixtral generate`` and ``mixtral chat``.

End to end on the random-weight ``tiny`` preset: what the commands print is exactly what ``LLM`` generates
for the same prompt (for chat: for mistral-common's encoding of the conversation so far). The chat REPL's
control flow (/reset, /exit, EOF, errors, empty replies) is also driven with a scripted LLM, whose received
prompts are compared with the real tokenizer's encoding of the expected conversation.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import pytest

from mixtral.cli import chat as chat_cli
from mixtral.cli import generate as generate_cli
from mixtral.cli.main import main
from mixtral.tokenizer import Tokenizer


class ScriptedLLM:
    """Stands in for ``mixtral.LLM`` in the REPL tests: replies from a script, records every prompt."""

    def __init__(self, tokenizer: Tokenizer, replies: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.replies = list(replies)
        self.prompts: list[list[int]] = []
        self.params: list[Any] = []

    def stream(self, prompt: Sequence[int], params: Any) -> Iterator[Any]:
        self.prompts.append(list(prompt))
        self.params.append(params)
        reply = self.replies.pop(0)
        cuts = [*range(0, len(reply), 3), len(reply)]  # cumulative text growing a few chars at a time
        for n, cut in enumerate(cuts):
            last = n == len(cuts) - 1
            yield SimpleNamespace(finished=last, outputs=[
                SimpleNamespace(text=reply[:cut], finish_reason="stop" if last else None)])


@pytest.fixture(scope="module")
def v3() -> Tokenizer:
    return Tokenizer.from_version("v3")


def run_chat(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, llm: Any, stdin: str,
             *flags: str) -> tuple[int, str, str]:
    monkeypatch.setattr(generate_cli, "build_llm", lambda args: llm)
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(["chat", "--temperature", "0", *flags])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_chat_repl_history_reset_and_exit(monkeypatch, capsys, v3: Tokenizer) -> None:
    llm = ScriptedLLM(v3, ["Hello there!", "I am fine.", "Bonjour."])
    stdin = "Hi\n\nHow are you?\n/reset\nSalut\n/exit\nnever read\n"
    code, out, err = run_chat(monkeypatch, capsys, llm, stdin, "--system", "Be brief.", "--max-tokens", "7")
    assert code == 0
    assert out == "Hello there!\nI am fine.\nBonjour.\n"
    assert "conversation cleared" in err
    sys_msg = {"role": "system", "content": "Be brief."}
    expected = [
        [sys_msg, {"role": "user", "content": "Hi"}],
        [sys_msg, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"},
         {"role": "user", "content": "How are you?"}],
        [sys_msg, {"role": "user", "content": "Salut"}],  # after /reset only the system prompt remains
    ]
    assert llm.prompts == [v3.encode_chat(messages) for messages in expected]
    assert llm.replies == []  # the line after /exit was never sent
    assert all(p.temperature == 0 and p.max_tokens == 7 for p in llm.params)


def test_chat_ends_at_eof_and_reports_errors(monkeypatch, capsys) -> None:
    v1 = Tokenizer.from_version("v1")
    llm = ScriptedLLM(v1, ["", "ok"])
    code, out, err = run_chat(monkeypatch, capsys, llm, "first\n/bogus\nsecond")  # no /exit, no final newline
    assert code == 0
    assert "empty reply" in err and "unknown command '/bogus'" in err
    # the empty reply (refused by mistral-common as an assistant message) was dropped with its question
    assert llm.prompts[1] == v1.encode_chat([{"role": "user", "content": "second"}])
    assert out == "\nok\n"


def test_chat_encoding_error_is_reported_and_undone(v3: Tokenizer) -> None:
    llm = ScriptedLLM(v3, ["fine"])
    session = chat_cli.ChatSession(llm, SimpleNamespace(max_tokens=4), system=None)
    session.messages.append({"role": "tool", "content": "x"})  # a history mistral-common refuses
    err = io.StringIO()
    assert session.turn("hi", io.StringIO(), err) is None
    assert err.getvalue().startswith("error: ") and "tool_call_id" in err.getvalue()
    assert session.messages == [{"role": "tool", "content": "x"}]


def test_generate_reads_prompt_from_stdin(monkeypatch, capsys, v3: Tokenizer) -> None:
    seen: list[Any] = []

    class EchoLLM(ScriptedLLM):
        def stream(self, prompt: Any, params: Any) -> Iterator[Any]:
            seen.append((prompt, params))
            return super().stream(v3.encode(prompt), params)

    monkeypatch.setattr(generate_cli, "build_llm", lambda args: EchoLLM(v3, ["done"]))
    monkeypatch.setattr(sys, "stdin", io.StringIO("a prompt\nover two lines"))
    assert main(["generate", "-", "--top-k", "5", "--top-p", "0.9", "--seed", "3", "--stop", "x", "--stop", "y"]) == 0
    assert capsys.readouterr().out == "done\n"
    prompt, params = seen[0]
    assert prompt == "a prompt\nover two lines"
    assert (params.top_k, params.top_p, params.seed, params.stop) == (5, 0.9, 3, ["x", "y"])


def test_bad_sampling_flag_is_a_clear_error(monkeypatch, capsys) -> None:
    monkeypatch.setattr(generate_cli, "build_llm", lambda args: pytest.fail("must not load a model"))
    assert main(["generate", "hi", "--top-p", "1.5"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_unknown_model_is_one_clear_line(capsys) -> None:
    for command in (["generate", "hi"], ["chat"]):
        assert main([*command, "--model", "no-such-model-xyz", "--device", "cpu"]) == 1
        err = capsys.readouterr().err
        assert "cannot load model 'no-such-model-xyz'" in err and "Traceback" not in err


def test_help_explains_every_flag(capsys) -> None:
    for command in ("generate", "chat"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        for flag in ("--model", "--device", "--dtype", "--max-tokens", "--temperature", "--top-p", "--top-k",
                     "--seed", "--stop"):
            assert flag in text
        assert "default: demo" in text
    with pytest.raises(SystemExit):
        main(["chat", "--help"])
    assert "/reset" in capsys.readouterr().out


# ---------------------------------------------------------------------------- end to end on the tiny preset
TINY = ["--model", "tiny", "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="module")
def tiny_llm() -> Any:
    from mixtral import LLM

    return LLM("tiny", device="cpu", dtype="float32")


def greedy_text(llm: Any, prompt: str | list[int], max_tokens: int) -> str:
    from mixtral import SamplingParams

    outputs = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return outputs[0].outputs[0].text


class RecordingStdout(io.StringIO):
    """stdout that remembers each write, to see that text arrives in pieces while it is generated."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)

    def isatty(self) -> bool:
        return False


def test_generate_streams_what_llm_generates(monkeypatch, tiny_llm) -> None:
    stdout = RecordingStdout()
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["generate", "The capital of France is", *TINY, "--max-tokens", "12", "--temperature", "0"]) == 0
    expected = greedy_text(tiny_llm, "The capital of France is", 12)
    assert stdout.getvalue() == expected + ("" if expected.endswith("\n") else "\n")
    assert len([w for w in stdout.writes if w]) > 2  # streamed, not printed at the end


def test_generate_seed_reproduces_and_stop_string(monkeypatch, tiny_llm) -> None:
    def sample(*flags: str) -> str:
        stdout = RecordingStdout()
        monkeypatch.setattr(sys, "stdout", stdout)
        assert main(["generate", "Once upon a time", *TINY, "--max-tokens", "10", *flags]) == 0
        return stdout.getvalue()

    first = sample("--temperature", "1.0", "--seed", "7")
    assert sample("--temperature", "1.0", "--seed", "7") == first
    full = greedy_text(tiny_llm, "Once upon a time", 10)
    stop = full.strip()[3:5]  # two characters from inside the greedy output (random weights: ten odd tokens)
    assert len(stop) == 2
    cut = sample("--temperature", "0", "--stop", stop, "--stop", "never-generated")
    assert cut == full[: full.index(stop)] + "\n"


def test_chat_end_to_end_matches_llm_on_the_chat_template(monkeypatch, capsys, tiny_llm) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi there\nTell me more\n/reset\nHello\n"))
    assert main(["chat", *TINY, "--system", "Be brief.", "--max-tokens", "6", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    tok = tiny_llm.tokenizer
    system = {"role": "system", "content": "Be brief."}
    history: list[dict[str, str]] = [system]
    expected = []
    for line in ("Hi there", "Tell me more", None, "Hello"):
        if line is None:
            history = [system]
            continue
        history.append({"role": "user", "content": line})
        reply = greedy_text(tiny_llm, tok.encode_chat(history), 6).removeprefix(" ")  # word-start space
        expected.append(reply + "\n")
        if reply.strip():
            history.append({"role": "assistant", "content": reply})
        else:
            history.pop()
    assert out == "".join(expected)


def test_console_script_subprocess() -> None:
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "mixtral.cli.main", "chat", *TINY, "--max-tokens", "4", "--temperature", "0"],
        input="Hi\n/exit\n", capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n") and result.stdout.count("\n") >= 1

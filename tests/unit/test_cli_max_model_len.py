"""``generate``/``chat --max-model-len``: the flag the engine's "prompt too long" message tells users to raise."""

from __future__ import annotations

import pytest

from mixtral.cli.main import main


def test_generate_max_model_len_reaches_the_engine(capsys) -> None:
    assert main(["generate", "word " * 40, "--model", "tiny", "--device", "cpu", "--max-model-len", "16",
                 "--max-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert "max_model_len is 16" in err and "--max-model-len" in err


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_max_model_len_is_documented(capsys, command: str) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--max-model-len N" in capsys.readouterr().out

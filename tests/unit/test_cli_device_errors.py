"""``--device cuda`` where no GPU is visible is one clear line, not torch's bare AssertionError traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixtral.cli.main import main


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("argv", [["generate", "hi"], ["chat"]])
def test_generate_and_chat_name_the_missing_gpu(no_cuda: None, capsys, argv: list[str]) -> None:
    assert main([*argv, "--model", "tiny", "--device", "cuda", "--max-tokens", "1"]) == 1
    err = capsys.readouterr().err
    assert "--device cuda:" in err and "use --device cpu" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("device", "message"), [("cuda", "CUDA is not available"), ("bogus", "not a torch device")])
def test_train_names_a_bad_device(no_cuda: None, tmp_path: Path, capsys, device: str, message: str) -> None:
    data = tmp_path / "d.txt"
    data.write_text("text\n")
    argv = ["train", "--preset", "tiny", "--data", str(data), "-o", str(tmp_path / "out"), "--device", device]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("mixtral train: error: ") and message in err

"""A model folder whose tokenizer has more ids than the model's vocabulary is refused with both sizes named."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mixtral.checkpoint.loader import resolve
from mixtral.checkpoint.tokenizer_files import packaged_tokenizer
from mixtral.checkpoint.writer import RandomSource, write_checkpoint
from mixtral.cli.main import main
from mixtral.model.presets import preset
from mixtral.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def v1_model_with_v3_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    args = preset("tiny-v1")  # 32000 ids, as Mixtral-8x7B
    folder = write_checkpoint(RandomSource(args), args, tmp_path_factory.mktemp("mismatch"), "hf", progress=False)
    (folder / "tokenizer.model.v1").unlink()
    shutil.copy(packaged_tokenizer("v3"), folder / "tokenizer.model.v3")
    return folder


def test_for_model_refuses_a_larger_tokenizer(v1_model_with_v3_tokenizer: Path) -> None:
    with pytest.raises(ValueError, match=r"32768 ids but the model .* vocabulary of 32000"):
        Tokenizer.for_model(resolve(v1_model_with_v3_tokenizer))


def test_generate_reports_it_in_one_line(v1_model_with_v3_tokenizer: Path, capsys) -> None:
    assert main(["generate", "hi", "--model", str(v1_model_with_v3_tokenizer), "--device", "cpu"]) == 1
    assert "do not belong together" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["tiny", "tiny-v1", "tiny-odd"])
def test_matching_tokenizers_load(name: str) -> None:
    source = resolve(name)
    assert Tokenizer.for_model(source).vocab_size == source.args.vocab_size

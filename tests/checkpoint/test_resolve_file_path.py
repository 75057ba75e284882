"""A path to a file inside a model folder (config.json, model.safetensors) names the folder to pass instead of
being looked up on the Hugging Face Hub as if ``folder/file`` were a repo id."""

from __future__ import annotations

from pathlib import Path

import pytest

from mixtral.checkpoint.errors import CheckpointError
from mixtral.checkpoint.loader import resolve


@pytest.mark.parametrize("file", ["config.json", "model.safetensors"])
def test_a_file_path_names_its_folder(tiny_hf_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, file: str) -> None:
    monkeypatch.chdir(tiny_hf_checkpoint.parent)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a regression must not reach for the network
    relative = f"{tiny_hf_checkpoint.name}/{file}"  # shaped like an org/name repo id
    want = rf"is a file; pass the model folder that holds it \({tiny_hf_checkpoint.name}\)"
    with pytest.raises(CheckpointError, match=want):
        resolve(relative)

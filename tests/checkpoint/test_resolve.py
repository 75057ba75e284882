"""resolve(): folders of either format, presets, the bundled demo, and clear errors for anything else."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mixtral.checkpoint import loader
from mixtral.checkpoint.errors import CheckpointError
from mixtral.checkpoint.loader import load_model, resolve
from mixtral.checkpoint.tokenizer_files import packaged_tokenizer
from mixtral.model.presets import PRESETS


def test_folder_formats(tiny_hf_checkpoint: Path, tiny_consolidated_checkpoint: Path) -> None:
    hf, mistral = resolve(tiny_hf_checkpoint), resolve(str(tiny_consolidated_checkpoint))
    assert (hf.format, mistral.format) == ("hf", "mistral")
    assert hf.folder == tiny_hf_checkpoint and hf.tokenizer_file == tiny_hf_checkpoint / "tokenizer.model.v3"
    assert hf.args == mistral.args == PRESETS["tiny"]


def test_folder_with_both_formats_prefers_hf(tiny_hf_checkpoint: Path, tiny_consolidated_checkpoint: Path,
                                             tmp_path: Path) -> None:
    both = tmp_path / "both"
    shutil.copytree(tiny_hf_checkpoint, both)
    for name in ("params.json", "consolidated.safetensors"):
        shutil.copy(tiny_consolidated_checkpoint / name, both / name)
    assert resolve(both).format == "hf"
    (both / "model.safetensors").unlink()
    assert resolve(both).format == "mistral"


def test_bare_tokenizer_model_version_follows_the_vocabulary(tiny_hf_checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_hf_checkpoint, folder)
    (folder / "tokenizer.model.v3").rename(folder / "tokenizer.model")  # how many Hub repos name it
    source = resolve(folder)
    assert source.args.tokenizer == "v3" and source.tokenizer_file == folder / "tokenizer.model"


@pytest.mark.parametrize("name", ["tiny", "tiny-v1", "mixtral-8x22b-instruct"])
def test_presets(name: str) -> None:
    source = resolve(name)
    assert source.format == "preset" and source.folder is None and source.args == PRESETS[name]
    assert source.tokenizer_file == packaged_tokenizer(PRESETS[name].tokenizer)


def test_preset_loads_on_the_target_dtype_in_eval_mode() -> None:
    model = load_model("tiny-odd", dtype="bf16", seed=3)
    assert model.dtype == torch.bfloat16 and not model.training
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.equal(model.state_dict()["output.weight"], load_model("tiny-odd", dtype="bf16", seed=3).output.weight)


def test_demo_missing_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "demo_folder", lambda: tmp_path / "absent")
    with pytest.raises(CheckpointError, match="bundled demo model is missing"):
        resolve("demo")


def test_demo_resolves_to_the_bundled_folder(tiny_hf_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "demo_folder", lambda: tiny_hf_checkpoint)
    source = resolve("demo")
    assert source.name == "demo" and source.folder == tiny_hf_checkpoint and source.format == "hf"


def test_progress_bar_can_be_forced(tiny_hf_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = load_model(tiny_hf_checkpoint, progress=True)
    assert torch.equal(model.norm.weight, load_model(tiny_hf_checkpoint, progress=False).norm.weight)
    capsys.readouterr()


@pytest.mark.parametrize("name", ["", "not/a/repo/id", "../up"])
def test_names_that_are_nothing(name: str) -> None:
    with pytest.raises(CheckpointError, match="is not a model folder, a preset"):
        resolve(name)

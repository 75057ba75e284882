"""Hugging Face repo ids resolve through huggingface_hub's cache; with HF_HUB_OFFLINE=1 nothing touches the network.

The test lays out a cache the way huggingface_hub does (``models--org--name/{refs/main, snapshots/<sha>/}``)
under a temporary HF_HOME, filled from the tiny checkpoint fixtures.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mixtral.checkpoint.errors import CheckpointError
from mixtral.checkpoint.loader import load_model, resolve

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fake_cache(home: Path, repo_id: str, folder: Path) -> Path:
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def offline_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


@pytest.mark.parametrize("fixture", ["tiny_hf_checkpoint", "tiny_consolidated_checkpoint"])
def test_repo_id_resolves_from_offline_cache(offline_home: Path, fixture: str,
                                             request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(fixture)
    snapshot = _fake_cache(offline_home, "someorg/Tiny-Mixtral", folder)
    source = resolve("someorg/Tiny-Mixtral")
    assert source.folder == snapshot
    assert source.repo_id == "someorg/Tiny-Mixtral"
    assert source.format == ("hf" if fixture == "tiny_hf_checkpoint" else "mistral")
    assert source.tokenizer_file == snapshot / "tokenizer.model.v3" and source.args.tokenizer == "v3"
    got = load_model("someorg/Tiny-Mixtral").state_dict()
    want = load_model(folder).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_repo_missing_from_offline_cache(offline_home: Path) -> None:
    with pytest.raises(CheckpointError, match=r"not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        resolve("someorg/Not-Cached")


def test_local_folder_wins_over_repo_id(tiny_hf_checkpoint: Path, offline_home: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    (offline_home / "org").mkdir()
    shutil.copytree(tiny_hf_checkpoint, offline_home / "org" / "model")
    monkeypatch.chdir(offline_home)
    source = resolve("org/model")
    assert source.repo_id is None and source.folder == Path("org/model")


def test_online_fetches_configs_first_then_one_formats_weights(tiny_hf_checkpoint: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Repos like Mixtral-8x22B ship HF shards AND a consolidated copy: only the chosen format is downloaded."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    calls: list[dict] = []

    def fake_snapshot_download(repo_id: str, **kwargs: object) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        return str(tiny_hf_checkpoint)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    source = resolve("someorg/Tiny-Mixtral")
    assert len(calls) == 1 and calls[0]["local_files_only"] is False
    assert not any(p.endswith(".safetensors") for p in calls[0]["allow_patterns"])  # configs and tokenizer only
    load_model("someorg/Tiny-Mixtral")
    weights = calls[-1]["allow_patterns"]
    assert source.format == "hf" and "model*.safetensors" in weights
    assert not any(p.startswith("consolidated") for p in weights)

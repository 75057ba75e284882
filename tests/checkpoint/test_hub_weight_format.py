"""A Hub repo with config.json AND params.json shows no weights before they are fetched: its file list on the Hub
decides the format, so a repo whose only weights are consolidated.safetensors loads through the consolidated path
(it used to be taken for an HF repo and fetched with no weights at all).

The fake ``snapshot_download`` behaves like huggingface_hub's: it copies into one snapshot folder the repo files
that match ``allow_patterns``, accumulating over calls; the fake ``list_repo_files`` lists the repo folder.
Nothing touches the network.
"""

from __future__ import annotations

import fnmatch
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mixtral.checkpoint.loader import load_model, resolve

CONSOLIDATED = ("params.json", "consolidated", "tokenizer")


def _fill(dest: Path, *sources: tuple[Path, tuple[str, ...]]) -> Path:
    """``dest`` holding, from each source folder, the files whose names start with one of the prefixes."""
    dest.mkdir(parents=True, exist_ok=True)
    for folder, prefixes in sources:
        for f in folder.iterdir():
            if f.name.startswith(prefixes):
                shutil.copy(f, dest / f.name)
    return dest


@dataclass
class FakeHub:
    repo: Path  # the repo's files, as the Hub holds them
    snapshot: Path  # where snapshot_download puts what it fetched
    listed: int = 0  # list_repo_files calls


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    """Online, with snapshot_download and list_repo_files served from ``hub.repo`` (filled by the test)."""
    import huggingface_hub
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    hub = FakeHub(tmp_path / "repo", tmp_path / "snapshot")
    hub.snapshot.mkdir()

    def fake_snapshot_download(repo_id: str, allow_patterns: list[str], **kwargs: object) -> str:
        for f in hub.repo.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, hub.snapshot / f.name)
        return str(hub.snapshot)

    def fake_list_repo_files(repo_id: str, revision: str | None = None, **kwargs: object) -> list[str]:
        hub.listed += 1
        return sorted(f.name for f in hub.repo.iterdir())

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", fake_list_repo_files)
    return hub


def _same_weights(got: torch.nn.Module, want: torch.nn.Module) -> bool:
    a, b = got.state_dict(), want.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)


def test_consolidated_only_repo_with_config_json_loads_as_mistral(
        fake_hub: FakeHub, tiny_hf_checkpoint: Path, tiny_consolidated_checkpoint: Path) -> None:
    _fill(fake_hub.repo, (tiny_hf_checkpoint, ("config.json",)), (tiny_consolidated_checkpoint, CONSOLIDATED))
    source = resolve("someorg/Consolidated-Only")
    assert source.format == "mistral" and fake_hub.listed == 1
    assert not list(fake_hub.snapshot.glob("*.safetensors"))  # detected before any weights were fetched
    got = load_model("someorg/Consolidated-Only", progress=False)
    assert [f.name for f in fake_hub.snapshot.glob("*.safetensors")] == ["consolidated.safetensors"]
    assert _same_weights(got, load_model(tiny_consolidated_checkpoint, progress=False))


def test_repo_listing_both_formats_fetches_only_the_hf_weights(
        fake_hub: FakeHub, tiny_hf_checkpoint: Path, tiny_consolidated_checkpoint: Path) -> None:
    # A single model.safetensors (no index) beside a consolidated copy: HF wins, as for a local folder.
    _fill(fake_hub.repo, (tiny_hf_checkpoint, ("config.json", "model")), (tiny_consolidated_checkpoint, CONSOLIDATED))
    assert resolve("someorg/Both").format == "hf" and fake_hub.listed == 1
    got = load_model("someorg/Both", progress=False)
    assert [f.name for f in fake_hub.snapshot.glob("*.safetensors")] == ["model.safetensors"]
    assert _same_weights(got, load_model(tiny_hf_checkpoint, progress=False))


def test_unambiguous_repos_are_not_listed(fake_hub: FakeHub, tiny_consolidated_checkpoint: Path) -> None:
    # params.json alone says consolidated: no extra Hub request.
    _fill(fake_hub.repo, (tiny_consolidated_checkpoint, CONSOLIDATED))
    assert resolve("someorg/Plain-Consolidated").format == "mistral" and fake_hub.listed == 0


def test_offline_cache_is_read_without_listing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               tiny_hf_checkpoint: Path, tiny_consolidated_checkpoint: Path) -> None:
    import huggingface_hub

    def no_network(*args: object, **kwargs: object) -> list[str]:
        raise AssertionError("HF_HUB_OFFLINE=1 must not list the repo on the Hub")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", no_network)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0123456789abcdef0123456789abcdef01234567"
    cached = tmp_path / "hub" / "models--someorg--Cached"  # huggingface_hub's cache layout
    _fill(cached / "snapshots" / commit, (tiny_hf_checkpoint, ("config.json",)),
          (tiny_consolidated_checkpoint, CONSOLIDATED))
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text(commit)
    assert resolve("someorg/Cached").format == "mistral"  # the cached weights tell

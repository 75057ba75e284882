"""A Hub repo fetched for the first time: the configs-only snapshot already holds the shard index, not the shards.

The fake ``snapshot_download`` behaves like huggingface_hub's: it copies into one snapshot folder only the repo
files that match ``allow_patterns``, accumulating over calls, so format detection sees what a real first fetch
of a sharded repo (Mixtral-8x7B has 19 shards and an index) shows it.
"""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

import pytest
import torch

from mixtral.checkpoint.loader import load_model, resolve
from mixtral.checkpoint.writer import convert_checkpoint


@pytest.fixture
def sharded_repo(tiny_hf_checkpoint: Path, tiny_consolidated_checkpoint: Path, tmp_path: Path) -> Path:
    """An HF repo with 4 shards + index, plus a consolidated copy (as Mixtral-8x22B's repos ship both)."""
    repo = tmp_path / "repo"
    convert_checkpoint(tiny_hf_checkpoint, repo, "hf", max_shard_bytes=2**20, progress=False)
    assert (repo / "model.safetensors.index.json").is_file()
    for f in tiny_consolidated_checkpoint.iterdir():
        if f.name.startswith(("consolidated", "params")):
            shutil.copy(f, repo / f.name)
    return repo


def test_first_fetch_of_a_sharded_repo_loads(sharded_repo: Path, tiny_hf_checkpoint: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()

    def fake_snapshot_download(repo_id: str, allow_patterns: list[str], **kwargs: object) -> str:
        for f in sharded_repo.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, snapshot / f.name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    source = resolve("someorg/Sharded-Mixtral")
    assert source.format == "hf"
    assert not list(snapshot.glob("*.safetensors"))  # only configs, index and tokenizer so far
    got = load_model("someorg/Sharded-Mixtral", progress=False).state_dict()
    assert len(list(snapshot.glob("model-*.safetensors"))) == 4
    assert not list(snapshot.glob("consolidated*"))  # the other format's weights are not downloaded
    want = load_model(tiny_hf_checkpoint, progress=False).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)

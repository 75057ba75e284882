"""Hugging Face Hub repo ids -> a local snapshot folder, through huggingface_hub's cache.

``HF_HUB_OFFLINE=1`` (read at call time, not import time) means: use the cache only, never the network.
Only the files the chosen format needs are fetched: configs and tokenizer first, then the weights of one
format (Mixtral repos often ship both HF shards and a consolidated copy; fetching both would double the
download).

Which format a repo's weights are in is read from the metadata snapshot when it tells (an HF shard index, or
weights already in the cache). A repo shipping both config.json and params.json shows neither before its
weights are fetched, so then the repo's file list on the Hub decides (``weight_format``): a repo whose only
weights are consolidated*.safetensors must not be taken for an HF one.
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path
from typing import Literal

from mixtral.checkpoint import consolidated, hf
from mixtral.checkpoint.errors import CheckpointError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_META_PATTERNS = ["config.json", "params.json", "*.index.json", "tokenizer.model*",
                  "mistral_instruct_tokenizer_*"]
_WEIGHT_PATTERNS = {
    "hf": ["model*.safetensors"],
    "mistral": ["consolidated*.safetensors"],
}


def is_repo_id(name: str) -> bool:
    """``org/name`` shaped, and not a path that exists locally (checked by the caller first)."""
    return bool(_REPO_ID.match(name)) and ".." not in name


def hub_offline() -> bool:
    import huggingface_hub.constants as hc

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return env in ("1", "ON", "YES", "TRUE") or bool(hc.HF_HUB_OFFLINE)


def _cache_dir() -> str | None:
    """Where the hub cache is, from the environment now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _snapshot(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = hub_offline()
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, cache_dir=_cache_dir(),
                                      local_files_only=offline))
    except LocalEntryNotFoundError as exc:
        hint = ("HF_HUB_OFFLINE is set, so only the local cache was searched; download it first with "
                f"`hf download {repo_id}`" if offline else "the Hub could not be reached")
        raise CheckpointError(f"model {repo_id!r} is not in the Hugging Face cache ({hint})") from exc
    except Exception as exc:  # network, auth, unknown repo: huggingface_hub's message says which
        raise CheckpointError(f"cannot fetch {repo_id!r} from the Hugging Face Hub: {exc}") from exc


def snapshot_metadata(repo_id: str, revision: str | None = None) -> Path:
    """Fetch (or find in the cache) the configs, indexes and tokenizer files of a repo; returns the folder."""
    return _snapshot(repo_id, revision, _META_PATTERNS)


def snapshot_weights(repo_id: str, fmt: str, revision: str | None = None) -> Path:
    """Fetch (or find) the weights of format ``fmt`` ("hf" or "mistral"); returns the snapshot folder."""
    return _snapshot(repo_id, revision, _META_PATTERNS + _WEIGHT_PATTERNS[fmt])


def repo_files(repo_id: str, revision: str | None = None) -> list[str]:
    """The names of the files at the top of a repo on the Hub (the weights of either format live there)."""
    import huggingface_hub

    try:
        names = huggingface_hub.list_repo_files(repo_id, revision=revision)
    except Exception as exc:  # network, auth, unknown repo: huggingface_hub's message says which
        raise CheckpointError(f"cannot list the files of {repo_id!r} on the Hugging Face Hub to tell the format "
                              f"of its weights: {exc}") from exc
    return [name for name in names if "/" not in name]


def format_of_files(names: list[str]) -> Literal["hf", "mistral"] | None:
    """The weights format that file names show: HF first (as for a local folder), then consolidated; None when
    they hold no weights this loader fetches."""
    for fmt in ("hf", "mistral"):
        if any(fnmatch.fnmatch(name, pattern) for name in names for pattern in _WEIGHT_PATTERNS[fmt]):
            return fmt  # type: ignore[return-value]
    return None


def weight_format(repo_id: str, folder: Path, revision: str | None = None) -> Literal["hf", "mistral"] | None:
    """The format of a repo's weights when its metadata snapshot ``folder`` cannot tell, from the repo's file list;
    None when the folder tells by itself (or offline, where the cache is all there is to look at).

    Ambiguous: both config.json and params.json, and no weights or shard index in the folder yet. Read from the
    folder alone, config.json would win and a consolidated-only repo would be fetched as an HF one with no weights.
    """
    both_configs = (folder / hf.CONFIG).is_file() and (folder / consolidated.PARAMS).is_file()
    if not both_configs or hf.has_hf_weights(folder) or consolidated.consolidated_weight_files(folder):
        return None
    if hub_offline():
        return None
    return format_of_files(repo_files(repo_id, revision))

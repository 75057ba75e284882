"""Hugging Face Hub repo ids -> a local snapshot folder, through huggingface_hub's cache.

``HF_HUB_OFFLINE=1`` (read at call time, not import time) means: use the cache only, never the network.
Only the files the chosen format needs are fetched: configs and tokenizer first, then the weights of one
format (Mixtral repos often ship both HF shards and a consolidated copy; fetching both would double the
download).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

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
                f"`huggingface-cli download {repo_id}`" if offline else "the Hub could not be reached")
        raise CheckpointError(f"model {repo_id!r} is not in the Hugging Face cache ({hint})") from exc
    except Exception as exc:  # network, auth, unknown repo: huggingface_hub's message says which
        raise CheckpointError(f"cannot fetch {repo_id!r} from the Hugging Face Hub: {exc}") from exc


def snapshot_metadata(repo_id: str, revision: str | None = None) -> Path:
    """Fetch (or find in the cache) the configs, indexes and tokenizer files of a repo; returns the folder."""
    return _snapshot(repo_id, revision, _META_PATTERNS)


def snapshot_weights(repo_id: str, fmt: str, revision: str | None = None) -> Path:
    """Fetch (or find) the weights of format ``fmt`` ("hf" or "mistral"); returns the snapshot folder."""
    return _snapshot(repo_id, revision, _META_PATTERNS + _WEIGHT_PATTERNS[fmt])

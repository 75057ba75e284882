"""Which mistral-common tokenizer file a model folder ships, and copying the right one into a new folder.

Files are named by version so the folder says which tokenizer encodes its prompts: ``tokenizer.model.v1``
(Mixtral-8x7B, 32000 ids) or ``tokenizer.model.v3`` (Mixtral-8x22B-Instruct, 32768 ids). Hub repos often
ship a bare ``tokenizer.model``; its version follows from the vocabulary size. The files themselves come
from mistral-common's package data, never from the network. ``TOKENIZER_FILES`` is the one table of the file
names a folder may hold.
"""

from __future__ import annotations

import importlib.resources
import shutil
from pathlib import Path

from mixtral.model.args import TOKENIZER_VERSIONS, default_tokenizer_for_vocab

# The mistral-common tokenizer files a model folder may hold, by version; the first is the name this project
# writes.
TOKENIZER_FILES = {
    "v3": ("tokenizer.model.v3", "mistral_instruct_tokenizer_240323.model.v3"),
    "v1": ("tokenizer.model.v1",),
}

# Version -> the file inside mistral_common/data.
PACKAGED = {"v1": "tokenizer.model.v1", "v3": "mistral_instruct_tokenizer_240323.model.v3"}


def packaged_tokenizer(version: str) -> Path:
    """The tokenizer file of ``version`` shipped inside the mistral-common package."""
    if version not in PACKAGED:
        raise ValueError(f"unknown tokenizer version {version!r}; expected one of {TOKENIZER_VERSIONS}")
    path = Path(str(importlib.resources.files("mistral_common") / "data" / PACKAGED[version]))
    if not path.is_file():
        raise FileNotFoundError(f"mistral-common lacks {PACKAGED[version]} (looked at {path}); reinstall "
                                "mistral-common[sentencepiece]")
    return path


def find_tokenizer(folder: Path, vocab_size: int) -> tuple[str, Path] | None:
    """(version, file) of the tokenizer a model folder ships, or None when it has none."""
    for version, names in TOKENIZER_FILES.items():
        for name in names:
            if (folder / name).is_file():
                return version, folder / name
    if (folder / "tokenizer.model").is_file():
        return default_tokenizer_for_vocab(vocab_size), folder / "tokenizer.model"
    return None


def copy_tokenizer(folder: Path, version: str, source: Path | None = None) -> Path:
    """Put the ``version`` tokenizer into ``folder`` as ``tokenizer.model.<version>``; returns its path.

    ``source`` is the file to copy (a source model's own tokenizer); by default mistral-common's copy.
    """
    dest = folder / TOKENIZER_FILES[version][0]
    shutil.copyfile(source or packaged_tokenizer(version), dest)
    return dest

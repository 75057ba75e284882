"""Resolve a model name to its config and files, and load it: meta-device build, then stream the weights.

``resolve(name)`` accepts a local folder (HF ``config.json`` or Mistral ``params.json``), a preset name from
model/args.py (random weights), ``"demo"`` (the model bundled in ``mixtral/demo``) or a Hugging Face repo id.
``load_model(name, device, dtype)`` builds the model on the meta device (no memory), allocates it once on the
target device in the target dtype, and copies each checkpoint tensor into its place as it is read (mmap):
host memory stays near one tensor. The whole checkpoint is validated from its headers first, so a bad file
fails before anything is loaded and a half-loaded model is never returned.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from mixtral.checkpoint import consolidated, hf, hub
from mixtral.checkpoint.errors import CheckpointError
from mixtral.checkpoint.progress import track
from mixtral.checkpoint.reader import CheckpointReader
from mixtral.checkpoint.tokenizer_files import find_tokenizer, packaged_tokenizer
from mixtral.model.args import ConfigError, ModelArgs
from mixtral.model.config_formats import args_from_hf_config, args_from_params_json, read_json
from mixtral.model.mixtral import Transformer, init_random_weights
from mixtral.model.presets import PRESETS

CheckpointFormat = Literal["hf", "mistral", "preset"]

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: its args, and (unless a preset) the folder and format of its weights."""

    name: str
    args: ModelArgs
    folder: Path | None
    format: CheckpointFormat
    # The mistral-common tokenizer file: the folder's own, or for presets the packaged file of args.tokenizer.
    tokenizer_file: Path | None
    repo_id: str | None = None  # set when resolved through the Hugging Face Hub


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch dtype, or one of "fp32"/"float32"/"bf16"/"bfloat16"/"fp16"/"float16"."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[key]


# --------------------------------------------------------------------------- resolve
def demo_folder() -> Path:
    """The bundled demo model's folder (``mixtral/demo`` inside the package)."""
    return Path(str(importlib.resources.files("mixtral") / "demo"))


def detect_format(folder: Path) -> Literal["hf", "mistral"]:
    """HF when config.json is there with HF weights; else consolidated when params.json is; else by config.

    HF weights are recognised by their names only (an index whose shards are not downloaded yet counts), so
    a Hub repo's config-only snapshot is detected the same as the full download; the reader validates later.
    """
    has_config, has_params = (folder / hf.CONFIG).is_file(), (folder / consolidated.PARAMS).is_file()
    if has_config and hf.has_hf_weights(folder):
        return "hf"
    if has_params and consolidated.consolidated_weight_files(folder):
        return "mistral"
    if has_config:
        return "hf"
    if has_params:
        return "mistral"
    raise CheckpointError(
        f"{folder} is not a model folder: it has neither config.json (Hugging Face) nor params.json (Mistral); "
        f"it holds {sorted(p.name for p in folder.iterdir())[:20]}"
    )


def resolve_folder(folder: Path, name: str | None = None, repo_id: str | None = None,
                   fmt: Literal["hf", "mistral"] | None = None) -> ModelSource:
    """Read a model folder's config and tokenizer (no weights are read). ``fmt``: the weights' format when known
    from elsewhere (a Hub repo's file list), else detected from the folder."""
    fmt = fmt or detect_format(folder)
    try:
        if fmt == "hf":
            args = args_from_hf_config(read_json(folder / hf.CONFIG))
        else:
            args = args_from_params_json(read_json(folder / consolidated.PARAMS))
    except ConfigError as exc:
        raise ConfigError(f"{folder}: {exc}") from exc
    found = find_tokenizer(folder, args.vocab_size)
    tokenizer_file = None
    if found is not None:
        version, tokenizer_file = found
        args = args.replace(tokenizer=version)
    return ModelSource(name or str(folder), args, folder, fmt, tokenizer_file, repo_id)


def resolve(name_or_path: str | Path) -> ModelSource:
    """A local folder, a preset, "demo", or a Hugging Face repo id (cache first; HF_HUB_OFFLINE respected)."""
    path = Path(name_or_path).expanduser()
    name = str(name_or_path)
    if name.strip() and path.is_dir():  # "" would otherwise mean the current directory
        return resolve_folder(path)
    if path.is_file():  # config.json or a weight file: the loader wants the folder holding them
        raise CheckpointError(f"{name!r} is a file; pass the model folder that holds it ({path.parent})")
    if isinstance(name_or_path, str):
        if name in PRESETS:
            args = PRESETS[name]
            return ModelSource(name, args, None, "preset", packaged_tokenizer(args.tokenizer))
        if name == "demo":
            folder = demo_folder()
            if not folder.is_dir():
                raise CheckpointError(
                    f"the bundled demo model is missing ({folder} does not exist); reinstall mixtral, or name "
                    f"a model folder, a Hugging Face repo id or a preset ({', '.join(sorted(PRESETS))})"
                )
            return resolve_folder(folder, name="demo")
        if hub.is_repo_id(name):
            folder = hub.snapshot_metadata(name)
            return resolve_folder(folder, name=name, repo_id=name, fmt=hub.weight_format(name, folder))
    raise CheckpointError(
        f"{name!r} is not a model folder, a preset ({', '.join(sorted(PRESETS))}), 'demo', or a Hugging Face "
        "repo id like 'mistralai/Mixtral-8x7B-v0.1'"
    )


def open_checkpoint(source: ModelSource, allow_pickle: bool = False) -> CheckpointReader:
    """A validated reader over the source's weights (downloading them first for a Hub repo)."""
    if source.format == "preset" or source.folder is None:
        raise ValueError(f"{source.name!r} is a preset: it has no checkpoint files")
    folder = source.folder
    if source.repo_id is not None:
        folder = hub.snapshot_weights(source.repo_id, source.format)
    return CheckpointReader(folder, source.format, source.args, allow_pickle=allow_pickle)


# --------------------------------------------------------------------------- load
def empty_model(args: ModelArgs, device: torch.device | str, dtype: torch.dtype) -> Transformer:
    """The model allocated (uninitialised) directly on ``device`` in ``dtype``: built on meta first."""
    with torch.device("meta"):
        model = Transformer(args)
    return model.to(dtype=dtype).to_empty(device=device)


def load_weights(model: Transformer, reader: CheckpointReader, progress: bool | None = None) -> None:
    """Copy every checkpoint tensor into its piece of the model's parameters, one tensor at a time."""
    params = dict(model.named_parameters())
    device = model.device
    covered = 0
    with torch.no_grad():
        for spec in track(reader.specs, len(reader.specs), f"loading {reader.folder.name}", progress):
            # Reading onto the device first makes the dtype cast (and RoPE permutation) run there.
            spec.select(params[spec.param]).copy_(reader.read(spec, device))
            covered += torch.Size(spec.shape).numel()
    expected = sum(p.numel() for p in params.values())
    if covered != expected:  # a spec list that missed a parameter would leave garbage behind
        raise RuntimeError(f"loaded {covered} weights but the model has {expected}")


def load_model(name_or_path: str | Path, device: torch.device | str = "cpu",
               dtype: torch.dtype | str = torch.float32, *, allow_pickle: bool = False,
               progress: bool | None = None, seed: int = 0) -> Transformer:
    """Load a model for inference (eval mode) on ``device`` in ``dtype``.

    ``name_or_path``: a folder, a preset (random weights from ``seed``), "demo" or a Hugging Face repo id.
    ``allow_pickle``: read .bin/.pt/.pth files (with ``torch.load(weights_only=True)``); refused otherwise.
    ``progress``: show a progress bar (default: when stderr is a terminal).
    Raises :class:`CheckpointError` naming the tensor and file when the checkpoint does not match its config.
    """
    source = resolve(name_or_path)
    torch_dtype = parse_dtype(dtype)
    device = torch.device(device)
    if source.format == "preset":
        model = empty_model(source.args, device, torch_dtype)
        init_random_weights(model, seed)
    else:
        with open_checkpoint(source, allow_pickle) as reader:  # validates everything before allocating
            model = empty_model(source.args, device, torch_dtype)
            load_weights(model, reader, progress)
    return model.eval()

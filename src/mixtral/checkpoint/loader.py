"""Resolve a model name to its config and files, and load it: meta-device build, then stream the weights.

``resolve(name)`` accepts a local folder (HF ``config.json`` or Mistral ``params.json``), a GGUF file or a
folder holding one, a preset name from model/args.py (random weights), ``"demo"`` (the model bundled in
``mixtral/demo``) or a Hugging Face repo id. ``load_model(name, device, dtype)`` builds the model on the meta
device (no memory), allocates it once on the target device in the target dtype, and copies each checkpoint
tensor into its place as it is read (mmap): host memory stays near one tensor. The whole checkpoint is
validated from its headers first, so a bad file fails before anything is loaded and a half-loaded model is
never returned. ``quantization=`` (and quantized checkpoints, detected from their files) swap the projections
for quantized weights before allocation and fill them piece by piece (checkpoint/quant_load.py).
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
from mixtral.kernels.config import KernelConfig
from mixtral.kernels.cpu_native import require_cpu_int_kernel
from mixtral.model.args import ConfigError, ModelArgs
from mixtral.model.config_formats import args_from_hf_config, args_from_params_json, read_json
from mixtral.model.mixtral import Transformer, init_random_weights
from mixtral.model.presets import PRESETS
from mixtral.model.quantized import packed_act_dtype, process_quantized, quant_weights, quantize_modules
from mixtral.quant.base import QuantMethod, QuantSpec

CheckpointFormat = Literal["hf", "mistral", "preset", "gguf"]

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
    file: Path | None = None  # the GGUF file (format "gguf")


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


def gguf_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.gguf"))


def resolve_gguf(path: Path, name: str | None = None) -> ModelSource:
    """A GGUF file's config and tokenizer, from its metadata (header only; checkpoint/gguf_file.py)."""
    from mixtral.checkpoint.gguf_file import GGUFCheckpoint

    ckpt = GGUFCheckpoint(path, quantized_output=False)
    return ModelSource(name or str(path), ckpt.args, path.parent, "gguf", ckpt.tokenizer_file, file=path)


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
    if path.is_file() and path.suffix == ".gguf":
        return resolve_gguf(path, name)
    if name.strip() and path.is_dir():  # "" would otherwise mean the current directory
        has_config = (path / hf.CONFIG).is_file() or (path / consolidated.PARAMS).is_file()
        ggufs = gguf_files(path)
        if not has_config and len(ggufs) == 1:
            return resolve_gguf(ggufs[0], name)
        if not has_config and len(ggufs) > 1:
            raise CheckpointError(f"{path} holds several GGUF files ({', '.join(p.name for p in ggufs)}); pass the "
                                  "one to load")
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


def open_checkpoint(source: ModelSource, allow_pickle: bool = False, quant: QuantSpec | None = None
                    ) -> CheckpointReader:
    """A validated reader over the source's weights (downloading them first for a Hub repo); ``quant``: the
    checkpoint's own quantization (its quantized pieces are checked by their format's rules)."""
    if source.format == "preset" or source.folder is None:
        raise ValueError(f"{source.name!r} is a preset: it has no checkpoint files")
    if source.format == "gguf":
        raise ValueError(f"{source.name!r} is a GGUF file: it is read through checkpoint/gguf_file.GGUFCheckpoint")
    folder = source.folder
    if source.repo_id is not None:
        folder = hub.snapshot_weights(source.repo_id, source.format)
    return CheckpointReader(folder, source.format, source.args, allow_pickle=allow_pickle, quant=quant)


# --------------------------------------------------------------------------- load
def empty_model(args: ModelArgs, device: torch.device | str, dtype: torch.dtype,
                methods: dict[str, QuantMethod] | None = None, ep_rank: int = 0, ep_size: int = 1) -> Transformer:
    """The model allocated (uninitialised) directly on ``device`` in ``dtype``: built on meta first, with the
    weights named in ``methods`` swapped for quantized ones (their stored tensors keep their own dtypes)."""
    with torch.device("meta"):
        model = Transformer(args, ep_rank=ep_rank, ep_size=ep_size)
    model = model.to(dtype=dtype)
    if methods:
        quantize_modules(model, methods)
    model = model.to_empty(device=device)
    for _, qw in quant_weights(model):
        # Start at 0 what pieces merge into: static FP8 input scales (maximum over the pieces) and act-order
        # permutations (write_piece checks that the pieces of one weight agree with what is already placed).
        for s in qw.method.stored():
            if s.name == "input_scale" or s.in_only:
                qw.tensors[s.name].zero_()
    return model


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
               dtype: torch.dtype | str = torch.float32, *, quantization: str | None = None,
               kernels: KernelConfig | None = None, allow_pickle: bool = False,
               progress: bool | None = None, seed: int = 0) -> Transformer:
    """Load a model for inference (eval mode) on ``device`` in ``dtype``.

    ``name_or_path``: a folder, a GGUF file (or a folder holding one), a preset (random weights from ``seed``),
    "demo" or a Hugging Face repo id.
    ``quantization``: "fp8", "int8" or "int4" quantizes a float checkpoint while it streams (the projections and
    experts; router, embeddings, norms and lm_head stay in ``dtype``); None loads a quantized checkpoint as it
    is (detected from config.json, or a GGUF file). A flag that conflicts with a quantized checkpoint fails.
    ``kernels``: the KernelConfig the model will run with (default ``KernelConfig()``); quantized weights are
    repacked for its kernels once loaded (the reference backend keeps the canonical layout).
    ``allow_pickle``: read .bin/.pt/.pth files (with ``torch.load(weights_only=True)``); refused otherwise.
    ``progress``: show a progress bar (default: when stderr is a terminal).
    Raises :class:`CheckpointError` naming the tensor and file when the checkpoint does not match its config,
    ``QuantConfigError`` (before anything is allocated) for a quantization it cannot load.
    """
    from mixtral.checkpoint import quant_load

    source = resolve(name_or_path)
    torch_dtype = parse_dtype(dtype)
    device = torch.device(device)
    kernels = kernels if kernels is not None else KernelConfig()
    require_cpu_int_kernel(kernels, device)  # before anything is allocated
    spec = quant_load.quant_spec_for(source, quantization)
    if source.format == "preset":
        methods = quant_load.model_methods(source.args, spec)
        model = empty_model(source.args, device, torch_dtype, methods)
        if methods:
            quant_load.init_random_quantized(model, source.args, seed)
        else:
            init_random_weights(model, seed)
    elif source.format == "gguf":
        from mixtral.checkpoint.gguf_file import GGUFCheckpoint

        assert source.file is not None
        ckpt = GGUFCheckpoint(source.file, quantized_output=False)  # validates every tensor before allocating
        model = empty_model(source.args, device, torch_dtype, quant_load.gguf_methods(ckpt))
        quant_load.load_gguf_weights(model, ckpt, progress)
    else:
        with open_checkpoint(source, allow_pickle, spec) as reader:  # validates everything before allocating
            methods = quant_load.model_methods(source.args, spec, reader)
            model = empty_model(source.args, device, torch_dtype, methods)
            if methods or reader.quant is not None:
                quant_load.load_checkpoint_weights(model, reader, progress)
            else:
                load_weights(model, reader, progress)
    model.set_kernel_config(kernels)
    process_quantized(model, packed_act_dtype(kernels, torch_dtype), kernels.cpu_int_kernel)
    return model.eval()

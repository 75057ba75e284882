"""Write checkpoints in either format — from a model, a state dict, another checkpoint, or random weights.

Everything goes through one loop: for each spec of the target format (hf.py / consolidated.py), get the
internal piece it stores from a *piece source*, convert it to the on-disk layout, and stream it into a
safetensors file (safetensors_io.py). Sources:
- :class:`StateDictSource`: a loaded model or an internal state dict (``save_checkpoint``);
- :class:`~mixtral.checkpoint.reader.CheckpointReader`: another checkpoint, read tensor by tensor
  (``convert_checkpoint``; the model is never built, so 8x22B converts in little host memory);
- :class:`RandomSource`: the same numbers ``init_random_weights`` gives on CPU, one parameter at a time
  (``mixtral init`` of a full-size preset never holds the whole model).
Each written folder gets its config (config.json or params.json) and its tokenizer file.

``quantization="fp8"`` (``mixtral convert --quantization fp8``) writes the attention projections and the experts
as compressed-tensors ``float-quantized`` FP8 (per-channel weight scales, dynamic per-token activations;
fp8_formats.py has the layout), each piece quantized as it streams; the router, embeddings, norms and lm_head
stay float. vLLM, SGLang and this loader read it; the compressed-tensors library decompresses it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from mixtral.checkpoint import consolidated, fp8_formats, hf
from mixtral.checkpoint.loader import open_checkpoint, resolve
from mixtral.checkpoint.progress import track
from mixtral.checkpoint.reader import format_specs
from mixtral.checkpoint.safetensors_io import write_safetensors
from mixtral.checkpoint.specs import PieceKey, TensorSpec
from mixtral.checkpoint.tokenizer_files import copy_tokenizer
from mixtral.model.args import ModelArgs
from mixtral.model.config_formats import args_to_hf_config, args_to_params_json
from mixtral.model.mixtral import Transformer
from mixtral.quant.fp8 import quantize_weight

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # what transformers uses for the Hub


class PieceSource(Protocol):
    """Something that gives internal pieces (see specs.py) by key."""

    def dtype_of(self, key: PieceKey) -> torch.dtype: ...

    def read_key(self, key: PieceKey, device: torch.device | str = "cpu") -> torch.Tensor: ...


class StateDictSource:
    """Pieces of an internal state dict (``Transformer.state_dict()`` names)."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self.state = state

    def _select(self, key: PieceKey) -> torch.Tensor:
        param, index = key
        if param not in self.state:
            raise KeyError(f"the state dict has no parameter {param!r}")
        return TensorSpec("", (), param, index).select(self.state[param])

    def dtype_of(self, key: PieceKey) -> torch.dtype:
        return self.state[key[0]].dtype

    def read_key(self, key: PieceKey, device: torch.device | str = "cpu") -> torch.Tensor:
        return self._select(key).detach().to(device)


class RandomSource:
    """Random pieces equal to ``init_random_weights(model, seed, std)`` on CPU, one parameter at a time.

    Parameters are generated in the model's parameter order from one CPU generator, so the pieces must be
    asked for in that order too (every format's specs are); only the current parameter is held.
    """

    def __init__(self, args: ModelArgs, seed: int = 0, std: float = 0.02) -> None:
        with torch.device("meta"):
            meta = Transformer(args)
        self._order = [(n, tuple(p.shape)) for n, p in meta.named_parameters()]
        self._next = 0
        self._gen = torch.Generator().manual_seed(seed)
        self._std = std
        self._name: str | None = None
        self._value: torch.Tensor | None = None

    def dtype_of(self, key: PieceKey) -> torch.dtype:
        return torch.float32

    def _param(self, name: str) -> torch.Tensor:
        while self._name != name:
            if self._next >= len(self._order):
                raise RuntimeError(f"parameter {name!r} asked for out of order")
            self._name, shape = self._order[self._next]
            self._next += 1
            self._value = None  # free the previous parameter before making the next
            if self._name.endswith("norm.weight"):
                self._value = torch.ones(shape)
            else:
                self._value = torch.randn(shape, generator=self._gen, dtype=torch.float32).mul_(self._std)
        assert self._value is not None
        return self._value

    def read_key(self, key: PieceKey, device: torch.device | str = "cpu") -> torch.Tensor:
        return TensorSpec("", (), key[0], key[1]).select(self._param(key[0])).to(device)


# --------------------------------------------------------------------------- writing
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


FP8_WRITE_SUFFIXES = ("_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight")  # the linears convert quantizes


def write_checkpoint(source: PieceSource, args: ModelArgs, folder: str | Path, format: str = "hf",
                     dtype: torch.dtype | None = None, tokenizer_version: str | None = None,
                     tokenizer_file: Path | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                     progress: bool | None = None, quantization: str | None = None) -> Path:
    """Write every piece of ``source`` as a ``format`` ("hf" or "mistral") checkpoint in ``folder``.

    ``dtype``: cast every tensor to it (default: keep each piece's dtype). HF output is sharded into files of
    at most ``max_shard_bytes`` (a single tensor larger than that gets a shard of its own), with an index
    when there is more than one shard. ``tokenizer_version`` (default ``args.tokenizer``) picks the tokenizer
    file copied in; ``tokenizer_file`` overrides where it is copied from. ``quantization``: "fp8" (HF only; see
    the module docstring).
    """
    if quantization not in (None, "fp8"):
        raise ValueError(f"convert writes quantization 'fp8' (compressed-tensors float-quantized), not "
                         f"{quantization!r}")
    if quantization is not None and format != "hf":
        raise ValueError("quantized checkpoints are written in the Hugging Face format (--to hf)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specs = format_specs(format, args)
    by_name = {s.name: s for s in specs}
    dtypes = {s.name: dtype or source.dtype_of(s.key) for s in specs}
    bar = iter(track(specs, len(specs), f"writing {folder.name}", progress))

    quantized = {s.name for s in specs if quantization is not None and s.name.endswith(FP8_WRITE_SUFFIXES)}
    scale_of: dict[str, str] = {}  # weight_scale tensor name -> its piece
    pending: dict[str, torch.Tensor] = {}  # a quantized piece's scale, written right after its codes

    def produce(name: str) -> torch.Tensor:
        if name in scale_of:
            return pending.pop(name)
        next(bar, None)
        spec = by_name[name]
        t = spec.from_internal(source.read_key(spec.key))
        if name in quantized:  # rows are quantized independently: a piece's codes are its rows of the whole
            codes, scale = quantize_weight(t)
            pending[f"{name.removesuffix('.weight')}.weight_scale"] = scale.reshape(-1, 1).contiguous()
            return codes.contiguous()
        return t.to(dtypes[name]).contiguous()

    entries: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    for s in specs:
        if s.name in quantized:
            written = [(n, dt, shape) for n, shape, dt in fp8_formats.write_entries(s)]  # codes, then scale
            entries += written
            scale_of.update((n, s.name) for n, _, _ in written[1:])
        else:
            entries.append((s.name, dtypes[s.name], s.shape))
    if format == "hf":
        _write_hf_shards(folder, entries, produce, max_shard_bytes)
        config = args_to_hf_config(args)
        written = {dtypes[s.name] for s in specs if s.name not in quantized}
        if len(written) == 1:
            config["torch_dtype"] = config["dtype"] = _dtype_name(written.pop())
        if quantized:
            config["quantization_config"] = fp8_formats.quantization_config_block()
        (folder / hf.CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    else:
        write_safetensors(folder / consolidated.SAFETENSORS, entries, produce)
        (folder / consolidated.PARAMS).write_text(json.dumps(args_to_params_json(args), indent=2) + "\n")
    next(bar, None)  # let the progress bar close
    copy_tokenizer(folder, tokenizer_version or args.tokenizer, tokenizer_file)
    return folder


def _write_hf_shards(folder: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], produce,
                     max_shard_bytes: int) -> None:
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    size = 0
    for entry in entries:
        nbytes = torch.Size(entry[2]).numel() * entry[1].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    for stale in [*folder.glob("model*.safetensors"), folder / hf.SAFETENSORS_INDEX]:
        stale.unlink(missing_ok=True)  # an earlier write's shards would otherwise shadow this one
    if len(shards) == 1:
        write_safetensors(folder / hf.SAFETENSORS, shards[0], produce)
        return
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(folder / fname, shard, produce)
        weight_map.update((name, fname) for name, _, _ in shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / hf.SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def save_checkpoint(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], args: ModelArgs,
                    folder: str | Path, format: str = "hf", tokenizer_version: str | None = None, *,
                    dtype: torch.dtype | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    progress: bool | None = None) -> Path:
    """Save a model (or its internal state dict) as an "hf" or "mistral" checkpoint folder; returns it."""
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    return write_checkpoint(StateDictSource(state), args, folder, format, dtype, tokenizer_version,
                            max_shard_bytes=max_shard_bytes, progress=progress)


def convert_checkpoint(src: str | Path, dst: str | Path, to: str, dtype: torch.dtype | None = None, *,
                       allow_pickle: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                       progress: bool | None = None, seed: int = 0, quantization: str | None = None) -> Path:
    """Convert any float model ``resolve`` accepts into a ``to`` ("hf" or "mistral") checkpoint at ``dst``.

    Tensors stream from source to destination one at a time; presets are written with their random weights.
    ``quantization="fp8"`` writes the compressed-tensors FP8 layout (module docstring).
    """
    source = resolve(src)
    if source.folder is not None and Path(dst).resolve() == source.folder.resolve():
        raise ValueError(f"destination {dst} is the source folder; write the conversion somewhere else")
    if source.format == "preset":
        return write_checkpoint(RandomSource(source.args, seed), source.args, dst, to, dtype,
                                max_shard_bytes=max_shard_bytes, progress=progress, quantization=quantization)
    if source.format == "gguf":
        raise ValueError(f"{src} is a GGUF file: convert reads float checkpoints (Hugging Face or Mistral)")
    from mixtral.checkpoint.quant_config import read_quant_config

    if source.format == "hf" and source.folder is not None and read_quant_config(source.folder) is not None:
        raise ValueError(f"{src} is a quantized checkpoint (its config.json has a quantization_config): convert "
                         "reads float checkpoints")
    with open_checkpoint(source, allow_pickle) as reader:
        return write_checkpoint(reader, source.args, dst, to, dtype, tokenizer_file=source.tokenizer_file,
                                max_shard_bytes=max_shard_bytes, progress=progress, quantization=quantization)

"""Open a checkpoint folder, validate it completely from headers, then read pieces one tensor at a time.

``CheckpointReader(folder, fmt, args)`` lists the format's expected tensors (hf.py / consolidated.py),
reads every file's header, and raises one :class:`CheckpointError` listing every missing, unexpected,
mis-shaped or truncated tensor — with its name and file — before a single weight is read. Only then can
``read(spec)`` stream tensors. Quantized HF checkpoints (``quant``: the QuantSpec of their config.json) hold a
quantized piece as a few tensors (codes, scales, ...): those are checked by the format's rules
(checkpoint/quant_entries.py) and read by name (``read_name``). Not here: building the model (loader.py) or
writing files (writer.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mixtral.checkpoint.consolidated import consolidated_specs, consolidated_weight_files
from mixtral.checkpoint.errors import CheckpointError
from mixtral.checkpoint.hf import hf_specs, hf_weight_files
from mixtral.checkpoint.quant_entries import check_quantized_piece, extra_names, quantized_entry_names
from mixtral.checkpoint.safetensors_io import LazySlice, SafetensorsReader, TensorInfo, read_header
from mixtral.checkpoint.specs import PieceKey, TensorSpec
from mixtral.model.args import ModelArgs
from mixtral.quant.base import QuantSpec

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# Buffers some old exports saved next to the weights; recomputed by the model, safe to skip.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_MAX_LISTED = 10  # problems listed in one error message


def format_specs(fmt: str, args: ModelArgs) -> list[TensorSpec]:
    """The tensors a checkpoint of format ``fmt`` ("hf" or "mistral") holds for ``args``."""
    if fmt == "hf":
        return hf_specs(args)
    if fmt == "mistral":
        return consolidated_specs(args)
    raise ValueError(f"unknown checkpoint format {fmt!r}; expected 'hf' or 'mistral'")


class CheckpointReader:
    """A validated checkpoint: ``specs`` (in internal order), ``info[name]`` and ``read(spec, device)``."""

    def __init__(self, folder: Path, fmt: str, args: ModelArgs, allow_pickle: bool = False,
                 quant: QuantSpec | None = None) -> None:
        self.folder, self.format, self.args = Path(folder), fmt, args
        self.specs = format_specs(fmt, args)
        # A checkpoint quantized by its producer: which internal parameters it holds quantized.
        self.quant = quant if quant is not None and quant.source != "bf16" else None
        if self.quant is not None and fmt != "hf":
            raise CheckpointError(f"{self.folder}: quantized checkpoints are read in the Hugging Face layout, "
                                  f"not {fmt!r}")
        from mixtral.checkpoint.quant_config import quantized_params

        self.quantized: dict[str, bool] = quantized_params(self.quant, args) if self.quant is not None else {}
        self.by_key: dict[PieceKey, TensorSpec] = {s.key: s for s in self.specs}
        files, weight_map, index = self._weight_files()
        self.files = files
        if not files:
            wanted = "model.safetensors or its shards" if fmt == "hf" else "consolidated.safetensors"
            raise CheckpointError(
                f"no weight files for the {fmt!r} format in {self.folder} (expected {wanted}); "
                f"it holds: {sorted(p.name for p in self.folder.iterdir())}"
            )
        pickles = [f for f in files if f.suffix in PICKLE_SUFFIXES]
        if pickles and not allow_pickle:
            raise CheckpointError(
                f"{pickles[0]} is a pickle file; loading pickles can run arbitrary code, so it is refused. "
                "If you trust it, pass allow_pickle=True (CLI: --allow-pickle; it is then read with "
                "torch.load(weights_only=True)), or convert it once: `mixtral convert SRC DST --to hf --allow-pickle`"
            )
        self._pickles: dict[Path, dict[str, torch.Tensor]] = {}
        self.info = self._read_headers(files)
        self._validate(weight_map, index)
        self._safetensors = SafetensorsReader()
        # Each file's last tensor in reading order: reading it closes the file (see SafetensorsReader).
        self._last_in_file = {self.info[n].file: n for s in self.specs for n in self.names_of(s)}

    # ----------------------------------------------------------------- discovery and validation
    def _weight_files(self) -> tuple[list[Path], dict[str, str] | None, Path | None]:
        if self.format == "hf":
            return hf_weight_files(self.folder)
        return consolidated_weight_files(self.folder), None, None

    def _read_headers(self, files: list[Path]) -> dict[str, TensorInfo]:
        info: dict[str, TensorInfo] = {}
        for path in files:
            entries = self._pickle_entries(path) if path.suffix in PICKLE_SUFFIXES else read_header(path)
            for name, entry in entries.items():
                if name in info:
                    raise CheckpointError(f"tensor {name!r} appears in both {info[name].file} and {path}")
                info[name] = entry
        return info

    def _pickle_entries(self, path: Path) -> dict[str, TensorInfo]:
        try:
            # mmap: tensors stay on disk until read; weights_only: no arbitrary objects are unpickled.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise CheckpointError(f"cannot read {path} with torch.load(weights_only=True): {exc}") from exc
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"{path}: entry {bad[0]!r} is not a tensor")
        self._pickles[path] = state
        return {k: TensorInfo(v.dtype, tuple(v.shape), path) for k, v in state.items()}

    def is_quantized(self, spec: TensorSpec) -> bool:
        """Whether the checkpoint holds ``spec``'s piece quantized (several tensors, read by ``read_name``)."""
        return self.quantized.get(spec.param, False)

    def names_of(self, spec: TensorSpec) -> list[str]:
        """The on-disk tensors of ``spec``'s piece, in reading order."""
        if not self.is_quantized(spec):
            return [spec.name]
        assert self.quant is not None
        return [n for n in quantized_entry_names(spec, self.quant) if n in self.info]

    def _validate(self, weight_map: dict[str, str] | None, index: Path | None) -> None:
        problems: list[str] = []
        expected = {s.name: s for s in self.specs if not self.is_quantized(s)}
        quantized = [s for s in self.specs if self.is_quantized(s)]
        known = set(expected)
        if self.quant is not None:
            headers = {n: (i.dtype, i.shape) for n, i in self.info.items()}
            for spec in quantized:
                problems += check_quantized_piece(spec, self.quant, headers)
                known.update(quantized_entry_names(spec, self.quant))
            known.update(extra_names(self.quant, self.args))
        if weight_map is not None:
            for name, shard in weight_map.items():
                if name not in self.info:
                    problems.append(f"{index} says tensor {name!r} is in {shard}, but {self.folder / shard} lacks it")
                elif self.info[name].file.name != shard:
                    problems.append(f"{index} says tensor {name!r} is in {shard}, but it is in {self.info[name].file}")
        searched = ", ".join(f.name for f in self.files)
        for name, spec in expected.items():
            entry = self.info.get(name)
            if entry is None:
                via = f"{index.name} and " if index else ""
                problems.append(f"tensor {name!r} is missing from {self.folder} (searched {via}{searched})")
            elif entry.shape != spec.shape:
                problems.append(
                    f"tensor {name!r} in {entry.file} has shape {list(entry.shape)}, expected {list(spec.shape)} "
                    f"for this config"
                )
            elif not entry.dtype.is_floating_point:
                problems.append(f"tensor {name!r} in {entry.file} has dtype {entry.dtype}, expected a float type")
        for name, entry in self.info.items():
            if name not in known and not name.endswith(_IGNORED_SUFFIXES):
                problems.append(f"unexpected tensor {name!r} in {entry.file} (not part of a {self.format!r} "
                                f"Mixtral checkpoint with this config)")
        if problems:
            more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
            raise CheckpointError(
                f"checkpoint {self.folder} ({self.format} format) does not match its config "
                f"({len(problems)} problem(s)):\n  " + "\n  ".join(problems[:_MAX_LISTED]) + more
            )

    # ----------------------------------------------------------------- reading
    def dtype_of(self, key: PieceKey) -> torch.dtype:
        return self.info[self.by_key[key].name].dtype

    def read(self, spec: TensorSpec, device: torch.device | str = "cpu") -> torch.Tensor:
        """The tensor of ``spec`` in the internal layout, on ``device``, in its on-disk dtype."""
        device = torch.device(device)
        entry = self.info[spec.name]
        if entry.file in self._pickles:
            t = self._pickles[entry.file][spec.name].to(device)
        else:
            t = self._safetensors.get(entry.file, spec.name, device)
            if self._last_in_file.get(entry.file) == spec.name:
                self._safetensors.close_file(entry.file)
        return spec.to_internal(t)

    def read_name(self, name: str, device: torch.device | str = "cpu", close: bool = True) -> torch.Tensor:
        """One on-disk tensor by name, as stored (a quantized piece's codes or scales); KeyError when the checkpoint
        lacks it (a format's optional tensor). ``close``: close its file when it is the file's last in reading
        order (False for reads ahead of the main pass, e.g. GPTQ's g_idx probes)."""
        entry = self.info[name]
        if entry.file in self._pickles:
            return self._pickles[entry.file][name].to(device)
        t = self._safetensors.get(entry.file, name, torch.device(device))
        if close and self._last_in_file.get(entry.file) == name:
            self._safetensors.close_file(entry.file)
        return t

    def read_name_part(self, name: str, select: Callable[[Any], Any], device: torch.device | str = "cpu"
                       ) -> torch.Tensor:
        """The part of one on-disk tensor that ``select`` narrows out (a lazy slice: only those bytes are read)."""
        entry = self.info[name]
        if entry.file in self._pickles:
            return select(self._pickles[entry.file][name]).to(device)
        t = select(LazySlice(self._safetensors.get_slice(entry.file, name), entry.shape)).load().to(device)
        if self._last_in_file.get(entry.file) == name:
            self._safetensors.close_file(entry.file)
        return t

    def read_part(self, spec: TensorSpec, select: Callable[[Any], Any], device: torch.device | str = "cpu"
                  ) -> torch.Tensor:
        """Only the part of ``spec``'s tensor that ``select`` narrows out, on ``device``, in the on-disk layout
        (a tensor-parallel rank's slice). ``select`` gets an object with ``dim()`` and ``narrow()``: for
        safetensors a lazy slice, so just those bytes are read."""
        entry = self.info[spec.name]
        if entry.file in self._pickles:
            return select(self._pickles[entry.file][spec.name]).to(device)
        t = select(LazySlice(self._safetensors.get_slice(entry.file, spec.name), entry.shape)).load().to(device)
        self.done(spec)
        return t

    def done(self, spec: TensorSpec) -> None:
        """Close ``spec``'s file if it holds the file's last tensor (a sharded load skips the pieces other ranks
        hold)."""
        for name in self.names_of(spec):
            file = self.info[name].file
            if self._last_in_file.get(file) == name and file not in self._pickles:
                self._safetensors.close_file(file)

    def read_key(self, key: PieceKey, device: torch.device | str = "cpu") -> torch.Tensor:
        """The piece ``key`` (shared by both formats) in the internal layout."""
        return self.read(self.by_key[key], device)

    def total_bytes(self) -> int:
        return sum(torch.Size(i.shape).numel() * i.dtype.itemsize for i in self.info.values())

    def close(self) -> None:
        self._safetensors.close()
        self._pickles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

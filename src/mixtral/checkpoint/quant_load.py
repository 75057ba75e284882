"""Quantized loading: which scheme a load ends in, which weights it quantizes, and filling them piece by piece.

Three ways a model ends up quantized (``load_model(..., quantization=)``, checkpoint/loader.py):

1. ``--quantization fp8|int8|int4`` on a bf16/fp16/fp32 checkpoint (or a preset): each checkpoint piece (the
   q/k/v rows of ``wqkv``, one expert's w1/w3/w2, ...) is read onto the device and quantized there
   (``method.quantize``) straight into its rows of the stored tensors, which were allocated first. Peak device
   memory is the quantized model plus one piece and its temporaries (fp32 copies), never the float model.
   int4 takes group 128 where it divides every input width (``int4_group_for``), int8 one scale per channel.
2. A pre-quantized checkpoint detected from config.json (compressed-tensors, AutoFP8, AWQ, GPTQ): each quantized
   piece's tensors are read and repacked into the canonical layout (checkpoint/quant_entries.py).
3. A GGUF file: each piece arrives already canonical in its parameter's format (checkpoint/gguf_file.py).

After the last piece ``process_quantized`` repacks each weight once for its kernels. Everything that can be
refused (a conflicting flag, an unsupported config, a group size that does not fit) is refused before anything
is allocated. Not here: resolving names (loader.py), the model side (model/quantized.py).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from mixtral.checkpoint.errors import CheckpointError
from mixtral.checkpoint.hf import hf_specs
from mixtral.checkpoint.progress import track
from mixtral.checkpoint.quant_config import QuantConfigError, read_quant_config, resolve_quant_spec, spec_from_flag
from mixtral.checkpoint.quant_entries import dequantize_quantized_piece, piece_tensors, place_piece
from mixtral.checkpoint.reader import CheckpointReader
from mixtral.checkpoint.specs import TensorSpec
from mixtral.model.args import ModelArgs
from mixtral.model.quantized import QUANTIZABLE, QuantWeight, module_path, quant_weights
from mixtral.quant import QuantMethod, QuantSpec, get_method
from mixtral.quant.int_method import int4_group_for

if TYPE_CHECKING:
    from mixtral.checkpoint.gguf_file import GGUFCheckpoint
    from mixtral.checkpoint.loader import ModelSource

# What ``--quantization`` accepts: the schemes a float checkpoint is quantized to while loading, and (vLLM's
# spellings) the formats of pre-quantized checkpoints, which only confirm what the files hold.
QUANTIZATION_CHOICES = ("fp8", "int8", "int4", "awq", "gptq", "compressed-tensors", "gguf")


def flag_spec(flag: str, args: ModelArgs, tp_size: int = 1) -> QuantSpec:
    """``--quantization`` on an unquantized checkpoint: quantize while loading, int4 in groups that fit every
    input width (a tensor-parallel rank's too: wo and w2 are cut by input columns)."""
    spec = spec_from_flag(flag)
    if spec.method == "int4":
        try:
            group = int4_group_for((args.dim, args.hidden_dim // tp_size, args.q_size // tp_size))
        except ValueError as exc:
            raise QuantConfigError(f"--quantization int4: {exc}") from exc
        spec = replace(spec, group_size=group)
    return spec


def quant_spec_for(source: ModelSource, flag: str | None, tp_size: int = 1) -> QuantSpec | None:
    """The QuantSpec a load of ``source`` uses (None: float, or a GGUF file, whose plan is per tensor). Raises
    QuantConfigError for an unsupported config or a flag that conflicts with the checkpoint, naming both.
    ``tp_size``: the tensor-parallel size the weights will be cut for (int4's group must fit a rank's share)."""
    if flag is not None and flag not in QUANTIZATION_CHOICES:
        raise QuantConfigError(f"--quantization {flag!r} is not one of {', '.join(QUANTIZATION_CHOICES)}")
    if source.format == "gguf":
        if flag not in (None, "gguf"):
            raise QuantConfigError(
                f"--quantization {flag!r} conflicts with {source.name}: a GGUF file holds its own quantized types "
                "(weights are never re-quantized from one scheme to another); drop the flag")
        return None
    if source.format == "hf" and source.folder is not None:
        found = read_quant_config(source.folder)
        if found is not None:
            block, where = found
            spec = resolve_quant_spec(flag, {"quantization_config": block}, where)
            return spec
    if flag is None:
        return None
    return flag_spec(flag, source.args, tp_size)


def model_methods(args: ModelArgs, spec: QuantSpec | None, reader: CheckpointReader | None = None
                  ) -> dict[str, QuantMethod]:
    """Internal parameter -> the method it is stored with, for every weight the model keeps quantized: all of
    QUANTIZABLE's when quantizing while loading; those the checkpoint holds quantized otherwise (the config's
    ``ignore`` list leaves some float). Int checkpoints' specs are completed from the headers first (scale dtype,
    whether any g_idx is really act-order: ``int_formats.refine_spec``)."""
    if spec is None:
        return {}
    params = [s.param for s in hf_specs(args) if s.param.endswith(QUANTIZABLE)]
    params = list(dict.fromkeys(params))
    if spec.source == "bf16":
        method = get_method(spec)
        return {p: method for p in params}
    if reader is None:
        raise ValueError(f"a {spec.source} checkpoint is loaded through its reader")
    params = [p for p in params if reader.quantized.get(p, False)]
    if spec.method != "fp8":
        from mixtral.checkpoint.int_formats import refine_spec

        pieces = [s for s in reader.specs if s.param in params]
        headers = {n: (i.dtype, i.shape) for n, i in reader.info.items()}
        spec = refine_spec(spec, pieces, headers, lambda n: reader.read_name(n, close=False))
    method = get_method(spec)
    return {p: method for p in params}


def planned_methods(source: ModelSource, spec: QuantSpec | None) -> dict[str, QuantMethod]:
    """What a load of ``source`` with ``spec`` will quantize, from the config and headers alone (memory planning:
    model/footprint.py). Pre-quantized int checkpoints are counted with the spec's default scale dtype."""
    if source.format == "gguf":
        from mixtral.checkpoint.gguf_file import GGUFCheckpoint

        assert source.file is not None
        return gguf_methods(GGUFCheckpoint(source.file, quantized_output=False))
    if spec is None:
        return {}
    if spec.source == "bf16":
        return model_methods(source.args, spec)
    from mixtral.checkpoint.quant_config import quantized_params

    method = get_method(spec)
    return {p: method for p, on in quantized_params(spec, source.args).items() if on and p.endswith(QUANTIZABLE)}


def gguf_methods(ckpt: GGUFCheckpoint) -> dict[str, QuantMethod]:
    """The GGUF plan's quantized weights (each in the narrowest format holding its pieces exactly)."""
    from mixtral.quant.int_method import method_for_format

    return {p: method_for_format(fmt) for p, fmt in ckpt.plan.items() if fmt is not None and p.endswith(QUANTIZABLE)}


def _target(qweights: dict[str, QuantWeight], spec: TensorSpec) -> QuantWeight | None:
    return qweights.get(module_path(spec.param)) if spec.param.endswith(QUANTIZABLE) else None


def _numel(shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape).numel())


def _check_covered(model: torch.nn.Module, covered: int) -> None:
    expected = sum(p.numel() for p in model.parameters()) + sum(m.logical_numel for _, m in quant_weights(model))
    if covered != expected:  # a spec list that missed a weight would leave garbage behind
        raise RuntimeError(f"loaded {covered} weights but the model has {expected}")


def load_checkpoint_weights(model: torch.nn.Module, reader: CheckpointReader, progress: bool | None = None) -> None:
    """Fill ``model`` (float parameters and quantized weights, as ``quantize_modules`` laid it out) from
    ``reader``, one piece at a time: float pieces copied (dequantized when the checkpoint quantized a weight the
    model keeps float), quantized weights quantized here or repacked from the checkpoint's format."""
    params = dict(model.named_parameters())
    qweights = dict(quant_weights(model))
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    covered = 0
    with torch.no_grad():
        for spec in track(reader.specs, len(reader.specs), f"loading {reader.folder.name}", progress):
            target = _target(qweights, spec)

            def read(name: str) -> torch.Tensor:
                return reader.read_name(name, device)

            if target is not None:
                if reader.is_quantized(spec):
                    assert reader.quant is not None
                    piece = piece_tensors(spec, reader.quant, read)
                else:  # quantized here, on the device, piece by piece
                    piece = target.method.quantize(reader.read(spec, device))
                place_piece(target.tensors, target.method.stored(), spec.index, len(target.lead),
                            {k: v.to(device) for k, v in piece.items()})
            elif reader.is_quantized(spec):
                assert reader.quant is not None
                spec.select(params[spec.param]).copy_(dequantize_quantized_piece(spec, reader.quant, read, dtype))
            else:
                spec.select(params[spec.param]).copy_(reader.read(spec, device))
            covered += _numel(spec.shape)
    _check_covered(model, covered)


def load_gguf_weights(model: torch.nn.Module, ckpt: GGUFCheckpoint, progress: bool | None = None) -> None:
    """Fill ``model`` from a GGUF file: float pieces copied (cast to the model dtype), quantized pieces placed in
    their parameter's format (``ckpt.plan``)."""
    params = dict(model.named_parameters())
    qweights = dict(quant_weights(model))
    device = next(model.parameters()).device
    covered = 0
    with torch.no_grad():
        for spec in track(ckpt.specs, len(ckpt.specs), f"loading {ckpt.path.name}", progress):
            piece = ckpt.read(spec)
            target = _target(qweights, spec)
            if isinstance(piece, torch.Tensor):
                if target is not None:
                    raise CheckpointError(f"{ckpt.path}: {spec.name} is float but its weight is planned quantized")
                spec.select(params[spec.param]).copy_(piece.to(device))
            else:
                if target is None:
                    raise CheckpointError(f"{ckpt.path}: {spec.name} is quantized but its weight is planned float")
                place_piece(target.tensors, target.method.stored(), spec.index, len(target.lead),
                            {k: v.to(device) for k, v in piece.items()})
            covered += _numel(spec.shape)
    _check_covered(model, covered)


def init_random_quantized(model: torch.nn.Module, args: ModelArgs, seed: int = 0, std: float = 0.02) -> None:
    """Random weights for a quantized preset, piece by piece (as the sharded loader's presets): piece i of
    ``hf_specs`` is N(0, std) from a generator seeded by (seed, i), drawn on the model's device in fp32, rounded
    to the model dtype, then quantized into its rows when its weight is quantized. Norms at 1. The float model is
    never held: one piece at a time (an 8x22B expert's w1 is 400 MB in fp32)."""
    params = dict(model.named_parameters())
    qweights = dict(quant_weights(model))
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    gen = torch.Generator(device=device)
    covered = 0
    with torch.no_grad():
        for i, spec in enumerate(hf_specs(args)):
            covered += _numel(spec.shape)
            target = _target(qweights, spec)
            if target is None and spec.param.endswith("norm.weight"):
                spec.select(params[spec.param]).fill_(1.0)
                continue
            gen.manual_seed(seed * 1_000_003 + i)
            w = torch.randn(spec.shape, generator=gen, device=device, dtype=torch.float32).mul_(std).to(dtype)
            if target is None:
                spec.select(params[spec.param]).copy_(w)
            else:
                place_piece(target.tensors, target.method.stored(), spec.index, len(target.lead),
                            target.method.quantize(w))
            del w
    _check_covered(model, covered)

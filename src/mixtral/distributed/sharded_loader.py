"""Sharded loading: a rank builds its own part of the model and reads only its slices of the checkpoint.

Both checkpoint formats list the same pieces (checkpoint/specs.py: the q/k/v rows of ``wqkv``, one expert's
w1/w3 rows of ``w13``, one expert's ``w2``, ...). :func:`piece_part` says what a rank takes of each piece:

    piece                      rank's part                         where it goes in the rank's parameter
    q_proj / wq [H*hd, D]      rows of its query heads             wqkv rows [0, h*hd)
    k_proj / wk [KV*hd, D]     rows of its KV heads                wqkv rows [h*hd, h*hd + kv*hd)
    v_proj / wv                rows of its KV heads                wqkv rows [h*hd + kv*hd, h*hd + 2*kv*hd)
    o_proj / wo [D, H*hd]      columns of its query heads          wo
    expert e w1 / w3 [F, D]    rows [f0, f1) if e is its expert     w13[e - e0] first / second half
    expert e w2 [D, F]         columns [f0, f1) if e is its expert  w2[e - e0]
    the rest                   all (replicated)                    as in the full model

Rows and columns are cut with ``StoredTensor.rows`` / ``cols`` (quant/base.py) applied to a lazy safetensors
slice, so a quantized weight's codes and scales slice by the same rules and only the selected bytes are read.
Consolidated wq/wk rows permute within each head (RoPE layout), so whole heads slice before or after the
permutation alike; the rank permutes its own heads. Host memory stays near one slice; device memory is the
rank's share plus the replicated embeddings, norms, routers and lm_head.

Presets (random weights) draw each piece in full from a generator seeded by (seed, piece) and keep the rank's
slice: every rank agrees on replicated weights and the shards of a layout put together give the TP 1 model of
:func:`init_random_pieces`. (That is not ``init_random_weights``'s model, which draws whole parameters.)

Quantized weights (``quantization=``, or a pre-quantized checkpoint): a rank reads each of its pieces whole,
makes the piece's canonical stored tensors (quantizing a float piece on the device, or repacking the
checkpoint's format), and keeps its part of each through ``StoredTensor.rows`` / ``cols``: the same tensors
the one-process model holds, cut (a piece is at most one expert's matrix, so host and device memory stay near
one piece). Quantizing the whole piece before cutting matters for FP8, whose weight scale is per output row
over all its columns. GPTQ act-order weights (a stored column permutation) cannot be cut by input columns:
row-parallel wo / w2 of such a checkpoint are refused. GGUF files are not loaded sharded yet.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from mixtral.checkpoint.errors import CheckpointError
from mixtral.checkpoint.hf import hf_specs
from mixtral.checkpoint.loader import ModelSource, empty_model, open_checkpoint
from mixtral.checkpoint.progress import track
from mixtral.checkpoint.quant_entries import dequantize_quantized_piece, piece_tensors, place_piece
from mixtral.checkpoint.quant_load import model_methods, quant_spec_for
from mixtral.checkpoint.reader import CheckpointReader
from mixtral.checkpoint.specs import TensorSpec
from mixtral.distributed.config import ParallelConfig, RankLayout
from mixtral.kernels.config import KernelConfig
from mixtral.kernels.cpu_native import require_cpu_int_kernel
from mixtral.model.args import ModelArgs
from mixtral.model.mixtral import Transformer
from mixtral.model.quantized import (
    QUANTIZABLE,
    QuantWeight,
    module_path,
    packed_act_dtype,
    process_quantized,
    quant_weights,
)
from mixtral.quant.base import QuantMethod, QuantTensors, StoredTensor

# A plain (unquantized) weight: one stored tensor, one row per output row and one column per input column.
PLAIN = StoredTensor("weight", torch.float32)


@dataclass(frozen=True)
class PiecePart:
    """A rank's part of one checkpoint piece: logical rows / columns of the piece's [out, in] matrix (None: all)
    and ``local``, the same piece addressed in the rank's own parameter (index and RoPE head count)."""

    local: TensorSpec
    rows: tuple[int, int] | None = None
    cols: tuple[int, int] | None = None

    def select(self, t: Any, stored: StoredTensor = PLAIN) -> Any:
        """The rank's part of ``t`` (a tensor, or anything with ``dim`` and ``narrow``: a lazy slice)."""
        if self.rows is not None:
            t = stored.rows(t, *self.rows)
        if self.cols is not None:
            t = stored.cols(t, *self.cols)
        return t


def piece_part(spec: TensorSpec, args: ModelArgs, layout: RankLayout) -> PiecePart | None:
    """What ``layout``'s rank takes of ``spec`` (a piece of the full model), or None when it holds none of it."""
    hd = args.head_dim
    h0, h1 = layout.heads
    k0, k1 = layout.kv_heads
    e0, e1 = layout.experts
    f0, f1 = layout.ffn
    lq, lkv, lf = (h1 - h0) * hd, (k1 - k0) * hd, f1 - f0
    param = spec.param
    if param.endswith(".attention.wqkv.weight"):
        ((start, _),) = spec.index
        if start == 0:  # q
            rows, local, heads = (h0 * hd, h1 * hd), (0, lq), h1 - h0
        elif start == args.q_size:  # k
            rows, local, heads = (k0 * hd, k1 * hd), (lq, lq + lkv), k1 - k0
        else:  # v
            rows, local, heads = (k0 * hd, k1 * hd), (lq + lkv, lq + 2 * lkv), k1 - k0
        rope = heads if spec.rope_heads else 0
        return PiecePart(dataclasses.replace(spec, index=(local,), rope_heads=rope), rows=rows)
    if param.endswith(".attention.wo.weight"):
        return PiecePart(spec, cols=(h0 * hd, h1 * hd))
    if param.endswith(".feed_forward.w13"):
        e, (start, _) = spec.index
        if not e0 <= e < e1:
            return None
        half = 0 if start == 0 else lf  # w1 rows first, then w3 rows
        return PiecePart(dataclasses.replace(spec, index=(e - e0, (half, half + lf))), rows=(f0, f1))
    if param.endswith(".feed_forward.w2"):
        (e,) = spec.index
        if not e0 <= e < e1:
            return None
        return PiecePart(dataclasses.replace(spec, index=(e - e0,)), cols=(f0, f1))
    return PiecePart(spec)


def empty_shard(args: ModelArgs, layout: RankLayout, device: torch.device | str, dtype: torch.dtype,
                methods: dict[str, QuantMethod] | None = None) -> Transformer:
    """The rank's model (its shard args, its experts), allocated uninitialised on ``device``: built on meta first,
    the weights in ``methods`` quantized."""
    return empty_model(layout.shard_args(args), device, dtype, methods, layout.ep_rank, layout.ep_size)


def _target(qweights: dict[str, QuantWeight], spec: TensorSpec) -> QuantWeight | None:
    return qweights.get(module_path(spec.param)) if spec.param.endswith(QUANTIZABLE) else None


def place_part(target: QuantWeight, part: PiecePart, piece: QuantTensors, device: torch.device) -> None:
    """Cut the rank's part out of a whole piece's canonical stored tensors and place it in ``target``."""
    stored = target.method.stored()
    if part.cols is not None and any(s.in_only for s in stored):
        raise CheckpointError(f"{part.local.name}: act-order weights (a stored column permutation) cannot be split "
                              "by input columns, which tensor parallelism does to wo and the experts' w2; load this "
                              "checkpoint in one process, or use a checkpoint without act-order (desc_act)")
    local = {s.name: part.select(piece[s.name], s).to(device) for s in stored}
    place_piece(target.tensors, stored, part.local.index, len(target.lead), local)


@dataclass(frozen=True)
class ShardLoad:
    """What a rank loaded: its model and the checkpoint bytes it read (its slices, in their on-disk dtype)."""

    model: Transformer
    bytes_read: int


def load_shard_weights(model: Transformer, reader: CheckpointReader, layout: RankLayout,
                       progress: bool | None = None) -> int:
    """Copy the rank's part of every checkpoint piece into ``model``; returns the bytes read. Quantized weights
    (see the module docstring) are read whole per piece and cut after quantizing or repacking."""
    params = dict(model.named_parameters())
    qweights = dict(quant_weights(model))
    device = model.device
    dtype = model.dtype
    covered = bytes_read = 0
    with torch.no_grad():
        for spec in track(reader.specs, len(reader.specs), f"loading {reader.folder.name} (rank {layout.rank})",
                          progress):
            part = piece_part(spec, reader.args, layout)
            if part is None:
                reader.done(spec)
                continue
            target = _target(qweights, part.local)

            def read(name: str) -> torch.Tensor:
                return reader.read_name(name, device)

            if target is not None or reader.is_quantized(spec):
                if reader.is_quantized(spec):
                    assert reader.quant is not None
                    if target is None:  # a quantized router / lm_head the model keeps float
                        t = part.select(dequantize_quantized_piece(spec, reader.quant, read, dtype))
                        part.local.select(params[spec.param]).copy_(t)
                        covered += t.numel()
                        continue
                    piece = piece_tensors(spec, reader.quant, read)
                else:
                    piece = target.method.quantize(reader.read(spec, device))
                bytes_read += sum(v.numel() * v.element_size() for v in piece.values())
                place_part(target, part, piece, device)
                covered += _part_numel(part, spec)
                continue
            t = reader.read_part(spec, part.select, device)
            bytes_read += t.numel() * t.element_size()
            part.local.select(params[spec.param]).copy_(part.local.to_internal(t))
            covered += t.numel()
    expected = sum(p.numel() for p in params.values()) + sum(m.logical_numel for m in qweights.values())
    if covered != expected:  # a rule that missed part of a parameter would leave garbage behind
        raise RuntimeError(f"rank {layout.rank} loaded {covered} weights but its shard has {expected}")
    return bytes_read


def init_random_pieces(model: Transformer, args: ModelArgs, layout: RankLayout, seed: int = 0,
                       std: float = 0.02) -> None:
    """Random weights by piece: N(0, std) from a generator seeded by (seed, piece index), norms at 1."""
    params = dict(model.named_parameters())
    qweights = dict(quant_weights(model))
    gen = torch.Generator(device=model.device)
    with torch.no_grad():
        for i, spec in enumerate(hf_specs(args)):
            part = piece_part(spec, args, layout)
            if part is None:
                continue
            target = _target(qweights, part.local)
            if target is None and spec.param.endswith("norm.weight"):
                part.local.select(params[spec.param]).fill_(1.0)
                continue
            gen.manual_seed(seed * 1_000_003 + i)
            full = torch.randn(spec.shape, generator=gen, device=model.device, dtype=torch.float32)
            if target is not None:  # as quant_load.init_random_quantized: rounded to the model dtype, quantized whole
                place_part(target, part, target.method.quantize(full.mul_(std).to(model.dtype)), model.device)
                continue
            part.local.select(params[spec.param]).copy_(part.select(full).mul_(std))


def _part_numel(part: PiecePart, spec: TensorSpec) -> int:
    rows, cols = spec.shape[-2], spec.shape[-1]
    lead = 1
    for d in spec.shape[:-2]:
        lead *= d
    if part.rows is not None:
        rows = part.rows[1] - part.rows[0]
    if part.cols is not None:
        cols = part.cols[1] - part.cols[0]
    return lead * rows * cols


def load_shard(source: ModelSource, parallel: ParallelConfig, rank: int, device: torch.device | str,
               dtype: torch.dtype, *, seed: int = 0, allow_pickle: bool = False,
               progress: bool | None = None, quantization: str | None = None,
               kernels: KernelConfig | None = None) -> ShardLoad:
    """Rank ``rank``'s model of ``source`` under ``parallel``, in eval mode, with only its slices read.
    ``quantization`` and ``kernels`` as ``load_model``'s."""
    layout = parallel.layout(source.args, rank)
    if source.format == "gguf":
        raise CheckpointError(f"{source.name}: GGUF files are not loaded with tensor parallelism yet; load it in "
                              "one process (a Q4 8x22B fits one 80 GB GPU)")
    spec = quant_spec_for(source, quantization, parallel.tensor_parallel_size)  # refused before allocating
    kernels = kernels if kernels is not None else KernelConfig()
    require_cpu_int_kernel(kernels, device)
    if source.format == "preset":
        model = empty_shard(source.args, layout, device, dtype, model_methods(source.args, spec))
        init_random_pieces(model, source.args, layout, seed)
        read = 0
    else:
        with open_checkpoint(source, allow_pickle, spec) as reader:  # validates every header before allocating
            model = empty_shard(source.args, layout, device, dtype, model_methods(source.args, spec, reader))
            read = load_shard_weights(model, reader, layout, progress)
    process_quantized(model, packed_act_dtype(kernels, dtype), kernels.cpu_int_kernel)
    return ShardLoad(model.eval(), read)


def shard_parameters(args: ModelArgs, parallel: ParallelConfig, rank: int = 0) -> int:
    """Parameters rank ``rank`` holds (counted on the meta device; every rank holds the same number)."""
    with torch.device("meta"):
        layout = parallel.layout(args, rank)
        model = Transformer(layout.shard_args(args), ep_rank=layout.ep_rank, ep_size=layout.ep_size)
    return sum(p.numel() for p in model.parameters())

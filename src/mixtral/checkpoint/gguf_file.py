"""GGUF files (llama.cpp) as a Mixtral checkpoint: validated from the header, read one tensor at a time, every
quantized tensor repacked exactly into the canonical integer layout (quant/int_layout.py).

``GGUFCheckpoint(path)`` reads the header through ``gguf.GGUFReader`` (memory-mapped; no weight is read),
builds ModelArgs and picks the tokenizer from the metadata (gguf_meta.py), lists the tensors as
:class:`TensorSpec` pieces of the internal parameters, and raises one :class:`CheckpointError` listing every
missing, unexpected, mis-shaped or unsupported tensor before anything is allocated. ``plan`` then says, per
internal parameter, the :class:`IntFormat` it is stored in (or None: a float parameter), and ``read(spec)``
returns a piece: a float tensor, or canonical stored tensors already in the parameter's format.

Tensor names (numpy order = GGUF's dims reversed, so a matrix is [out, in] as the model holds it):
``token_embd``, ``output_norm``, ``output``, ``blk.N.attn_{norm,q,k,v,output}``, ``blk.N.ffn_norm``,
``blk.N.ffn_gate_inp`` (router) and the experts either merged, ``blk.N.ffn_{gate,up,down}_exps`` [E, F, D] /
[E, D, F], or (older files) one tensor per expert, ``blk.N.ffn_{gate,up,down}.E``. llama.cpp's converter
interleaves each head's RoPE pairs in attn_q/attn_k rows, as Mistral's consolidated format: the specs carry
the head count and the rows are permuted back (rows are whole quantization rows, so this is exact).

Which parameters stay quantized: the projections (wqkv, wo, w13, w2) and the lm_head when every piece of the
parameter is quantized, in the narrowest format holding all its pieces exactly (``common_format``: a Q4_K_M
file's wqkv mixes Q4_K wq with Q8_0 wk/wv and becomes int8 with fp32 scales and offsets). Embeddings,
norms and the router are float (dequantized exactly when the file quantized them); a parameter mixing float
and quantized pieces is float. Supported types: F32, F16, BF16 and gguf_quants.GGUF_TYPES.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixtral.checkpoint.errors import CheckpointError
from mixtral.checkpoint.gguf_meta import args_from_metadata, match_tokenizer
from mixtral.checkpoint.gguf_quants import FLOAT_TYPES, GGUF_TYPES, decode_blocks
from mixtral.checkpoint.specs import TensorSpec, interleaved_to_half
from mixtral.checkpoint.tokenizer_files import packaged_tokenizer
from mixtral.model.args import ModelArgs
from mixtral.quant.base import QuantTensors
from mixtral.quant.int_layout import IntFormat, common_format, convert, dequantize

QUANTIZABLE = ("attention.wqkv.weight", "attention.wo.weight", "feed_forward.w13", "feed_forward.w2")
_MAX_LISTED = 10


def gguf_specs(args: ModelArgs, merged_experts: bool) -> list[TensorSpec]:
    """Every tensor of a Mixtral GGUF, as pieces of the internal parameters, in internal order."""
    d, q, kv, f, e = args.dim, args.q_size, args.kv_size, args.hidden_dim, args.num_experts
    specs = [TensorSpec("token_embd.weight", (args.vocab_size, d), "tok_embeddings.weight")]
    for i in range(args.n_layers):
        blk, me = f"blk.{i}", f"layers.{i}"
        wqkv = f"{me}.attention.wqkv.weight"
        specs += [
            TensorSpec(f"{blk}.attn_norm.weight", (d,), f"{me}.attention_norm.weight"),
            TensorSpec(f"{blk}.attn_q.weight", (q, d), wqkv, ((0, q),), rope_heads=args.n_heads),
            TensorSpec(f"{blk}.attn_k.weight", (kv, d), wqkv, ((q, q + kv),), rope_heads=args.n_kv_heads),
            TensorSpec(f"{blk}.attn_v.weight", (kv, d), wqkv, ((q + kv, q + 2 * kv),)),
            TensorSpec(f"{blk}.attn_output.weight", (d, q), f"{me}.attention.wo.weight"),
            TensorSpec(f"{blk}.ffn_norm.weight", (d,), f"{me}.ffn_norm.weight"),
        ]
        w13, w2 = f"{me}.feed_forward.w13", f"{me}.feed_forward.w2"
        if merged_experts:
            specs += [
                TensorSpec(f"{blk}.ffn_gate_exps.weight", (e, f, d), w13, ((0, e), (0, f))),
                TensorSpec(f"{blk}.ffn_up_exps.weight", (e, f, d), w13, ((0, e), (f, 2 * f))),
                TensorSpec(f"{blk}.ffn_down_exps.weight", (e, d, f), w2),
            ]
        else:
            for x in range(e):
                specs.append(TensorSpec(f"{blk}.ffn_gate.{x}.weight", (f, d), w13, (x, (0, f))))
                specs.append(TensorSpec(f"{blk}.ffn_up.{x}.weight", (f, d), w13, (x, (f, 2 * f))))
            specs += [TensorSpec(f"{blk}.ffn_down.{x}.weight", (d, f), w2, (x,)) for x in range(e)]
        specs.append(TensorSpec(f"{blk}.ffn_gate_inp.weight", (e, d), f"{me}.feed_forward.gate.weight"))
    specs.append(TensorSpec("output_norm.weight", (d,), "norm.weight"))
    specs.append(TensorSpec("output.weight", (args.vocab_size, d), "output.weight"))
    return specs


def _open(path: Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(path, "r")
    except (ValueError, KeyError, IndexError) as exc:  # an unknown tensor type number, a truncated or foreign file
        raise CheckpointError(f"cannot read {path} as a GGUF file: {exc}") from exc


class GGUFCheckpoint:
    """A validated GGUF Mixtral: ``args``, ``tokenizer`` ("v1"/"v3"), ``tokenizer_file``, ``specs``, ``plan``
    (internal parameter -> IntFormat, or None for float) and ``read(spec)``.

    ``quantized``: keep the projections quantized (False: every parameter float, dequantized exactly, for a
    bf16/fp32 model from a GGUF file); ``quantized_output``: the same for the lm_head alone."""

    def __init__(self, path: Path | str, quantized: bool = True, quantized_output: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"GGUF file {self.path} does not exist")
        self._reader = _open(self.path)
        meta = {name: field.contents() for name, field in self._reader.fields.items()
                if not name.startswith("GGUF.")}
        self.tokenizer = match_tokenizer(meta, self.path)
        self.tokenizer_file = packaged_tokenizer(self.tokenizer)
        self.args = args_from_metadata(meta, self.path, self.tokenizer)
        self.tensors = {t.name: t for t in self._reader.tensors}
        merged = "blk.0.ffn_gate_exps.weight" in self.tensors
        self.specs = gguf_specs(self.args, merged)
        self.type_of = {name: t.tensor_type.name for name, t in self.tensors.items()}
        self._validate()
        self.plan = self._plan(quantized, quantized and quantized_output)

    # ----------------------------------------------------------------- validation
    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(reversed([int(x) for x in self.tensors[name].shape]))

    def _validate(self) -> None:
        problems: list[str] = []
        expected = {s.name: s for s in self.specs}
        for name, spec in expected.items():
            if name not in self.tensors:
                problems.append(f"tensor {name!r} is missing")
                continue
            shape, kind = self.shape_of(name), self.type_of[name]
            if shape != spec.shape:
                problems.append(f"tensor {name!r} has shape {list(shape)}, expected {list(spec.shape)} for this config")
            if kind not in FLOAT_TYPES and kind not in GGUF_TYPES:
                problems.append(f"tensor {name!r} has GGUF type {kind}, which is not supported (supported: "
                                f"{', '.join([*FLOAT_TYPES, *GGUF_TYPES])})")
        problems += [f"unexpected tensor {n!r} (not part of a Mixtral GGUF with this config)"
                     for n in self.tensors if n not in expected]
        if problems:
            more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
            raise CheckpointError(f"GGUF file {self.path} does not match its metadata ({len(problems)} problem(s)):"
                                  "\n  " + "\n  ".join(problems[:_MAX_LISTED]) + more)

    def _plan(self, quantized: bool, quantized_output: bool) -> dict[str, IntFormat | None]:
        types: dict[str, list[str]] = {}
        for s in self.specs:
            types.setdefault(s.param, []).append(self.type_of[s.name])
        plan: dict[str, IntFormat | None] = {}
        for param, kinds in types.items():
            quantizable = (quantized and param.endswith(QUANTIZABLE)) or (param == "output.weight" and quantized_output)
            if not quantizable or any(k in FLOAT_TYPES for k in kinds):
                plan[param] = None
                continue
            try:
                plan[param] = common_format([GGUF_TYPES[k][3] for k in dict.fromkeys(kinds)])
            except ValueError as exc:
                raise CheckpointError(f"{self.path}: the pieces of {param} ({', '.join(sorted(set(kinds)))}) cannot "
                                      f"share one layout: {exc}") from exc
        return plan

    # ----------------------------------------------------------------- reading
    def _raw(self, name: str) -> torch.Tensor:
        data = np.array(self.tensors[name].data, copy=True)  # out of the memory map, one tensor
        return torch.from_numpy(data)

    def read(self, spec: TensorSpec) -> torch.Tensor | QuantTensors:
        """The piece ``spec`` in the internal layout: a float tensor (its file dtype; fp32 when dequantized) when
        ``plan[spec.param]`` is None, else stored tensors in that format."""
        kind, fmt = self.type_of[spec.name], self.plan[spec.param]
        raw = self._raw(spec.name)
        if kind in FLOAT_TYPES:
            w = raw.view(FLOAT_TYPES[kind]).reshape(spec.shape) if kind == "BF16" else raw.reshape(spec.shape)
            return spec.to_internal(w)
        q = decode_blocks(kind, raw, spec.shape[-1])
        if spec.rope_heads:
            q = {k: interleaved_to_half(v, spec.rope_heads) for k, v in q.items()}
        if fmt is None:
            return dequantize(q, torch.float32)
        return convert(q, fmt)

    def total_bytes(self) -> int:
        return sum(int(t.n_bytes) for t in self.tensors.values())

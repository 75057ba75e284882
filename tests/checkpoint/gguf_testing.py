"""Write small Mixtral GGUF files with chosen per-tensor types, for the reader's tests.

The metadata and the encoding of each tensor are the product writer's (checkpoint/gguf_writer.py: ``add_metadata``,
``encode``, which quantizes with ``gguf.quants.quantize``); what is test-only here: random weights per tensor,
random valid blocks for the K-quants (gguf has no Python quantizer for them), foreign tensor types and extra tensors
to make bad files. q/k rows are interleaved per head as llama.cpp's ``permute`` does. ``write_gguf`` returns what
each tensor holds in the internal layout, from gguf's own dequantization: the reference the reader is held to.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch

from mixtral.checkpoint.gguf_file import GGUFCheckpoint, gguf_specs
from mixtral.checkpoint.gguf_meta import packaged_pieces
from mixtral.checkpoint.gguf_quants import GGUF_TYPES
from mixtral.checkpoint.gguf_writer import add_metadata, encode
from mixtral.checkpoint.specs import half_to_interleaved, interleaved_to_half
from mixtral.model.args import ModelArgs
from mixtral.model.mixtral import Transformer

PYTHON_QUANTIZABLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
F16_OFFSETS = {"Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def random_blocks(type_name: str, rows: int, in_features: int, rng: np.random.Generator) -> np.ndarray:
    """Valid random blocks of a K-quant type (its fp16 fields set to small positive values)."""
    block, nbytes, _, _ = GGUF_TYPES[type_name]
    raw = rng.integers(0, 256, size=(rows, in_features // block, nbytes), dtype=np.uint8)
    for off in F16_OFFSETS[type_name]:
        d = (rng.random((rows, in_features // block)) * 0.002 + 1e-4).astype(np.float16)
        raw[..., off:off + 2] = d.view(np.uint8).reshape(rows, in_features // block, 2)
    return raw.reshape(rows, -1)


def float_weight(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """N(0, 0.05) weights drawn per expert (merged ``ffn_*_exps`` tensors stack the per-expert draws), so a
    merged file and a per-expert file of one seed hold the same model."""
    def draw(key: str, shape: tuple[int, ...]) -> np.ndarray:
        rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    parts = name.split(".")
    if len(parts) > 2 and parts[2].endswith("_exps"):  # blk.N.ffn_gate_exps.weight -> experts blk.N.ffn_gate.E
        kind = parts[2].removesuffix("_exps")
        return np.stack([draw(f"{parts[0]}.{parts[1]}.{kind}.{e}", shape[1:]) for e in range(shape[0])])
    if len(parts) == 5:  # blk.N.ffn_gate.E.weight
        return draw(".".join(parts[:4]), shape)
    return draw(name, shape)


def write_gguf(path: Path, args: ModelArgs, types: Callable[[str], str], merged: bool = True, seed: int = 0,
               tokens: list[str] | None = None, extra: dict[str, tuple[str, np.ndarray]] | None = None
               ) -> dict[str, torch.Tensor]:
    """A Mixtral GGUF for ``args``; ``types(name)`` gives each tensor's GGUF type ("F32", "F16", "Q4_K", ...).
    Returns name -> fp32 tensor in the internal layout (q/k rows un-interleaved), as gguf dequantizes it.
    ``extra`` adds raw tensors (name -> (type, bytes)) to make bad files."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, "llama")
    add_metadata(w, args, tokens if tokens is not None else list(packaged_pieces(args.tokenizer)))
    expected: dict[str, torch.Tensor] = {}
    for spec in gguf_specs(args, merged):
        kind = types(spec.name)
        weight = float_weight(spec.name, spec.shape, seed)
        if spec.rope_heads:  # llama.cpp's converter interleaves each head's RoPE pairs
            weight = half_to_interleaved(torch.from_numpy(weight), spec.rope_heads).numpy()
        if kind in ("F32", "F16"):
            data = encode(weight, kind)
            w.add_tensor(spec.name, data)
            deq = data.astype(np.float32)
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            if kind in PYTHON_QUANTIZABLE:
                data = encode(weight, kind)
            elif kind not in GGUF_TYPES:  # a type the reader does not take: zero blocks of the right size
                block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
                data = np.zeros((*spec.shape[:-1], spec.shape[-1] // block * nbytes), dtype=np.uint8)
                w.add_tensor(spec.name, data, raw_dtype=qtype)
                continue
            else:
                rows = int(np.prod(spec.shape[:-1]))
                data = random_blocks(kind, rows, spec.shape[-1], rng).reshape(*spec.shape[:-1], -1)
            w.add_tensor(spec.name, data, raw_dtype=qtype)
            deq = gguf.quants.dequantize(data, qtype).reshape(spec.shape)
        t = torch.from_numpy(np.ascontiguousarray(deq, dtype=np.float32))
        expected[spec.name] = interleaved_to_half(t, spec.rope_heads) if spec.rope_heads else t
    for name, (kind, data) in (extra or {}).items():
        w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def q4_k_m(name: str) -> str:
    """llama.cpp's Q4_K_M choice for an 8-expert model: Q8_0 attn_k/attn_v, Q6_K output and (here) the
    ffn_down of layer 0, Q4_K elsewhere, F32 norms and router."""
    if name.endswith(("norm.weight", "ffn_gate_inp.weight")):
        return "F32"
    if ".attn_k." in name or ".attn_v." in name:
        return "Q8_0"
    if name == "output.weight" or name.startswith("blk.0.ffn_down"):
        return "Q6_K"
    return "Q4_K"


def load_float_model(path: Path) -> Transformer:
    """Our fp32 model with every weight read from the GGUF (dequantized where the file quantized it)."""
    ckpt = GGUFCheckpoint(path, quantized=False)
    model = Transformer(ckpt.args)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for spec in ckpt.specs:
            piece = ckpt.read(spec)
            assert isinstance(piece, torch.Tensor)
            spec.select(params[spec.param]).copy_(piece)
    return model.eval()

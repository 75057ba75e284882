"""Write a Mixtral checkpoint as a GGUF file that llama.cpp runs, with the ``gguf`` package's writer.

``convert_to_gguf(src, dst, gguf_type)`` (``mixtral convert SRC DST.gguf --to gguf --gguf-type q8_0``) streams the
pieces of any float checkpoint ``resolve`` accepts (an HF or Mistral folder, the demo model, a preset's random
weights) into one file, one tensor at a time: the tensor table is written first from the shapes alone, then each
tensor's bytes as it is read and quantized (``gguf.quants.quantize``, llama.cpp's own rounding), so host memory
stays near one expert's fp32 weights.

The layout is the one llama.cpp's converter writes and checkpoint/gguf_file.py reads: architecture ``llama``
with ``llama.expert_count``; merged experts ``blk.N.ffn_{gate,up,down}_exps``; attn_q/attn_k rows interleaved per
head (``TensorSpec.from_internal``); the sentencepiece vocabulary with scores and token types.

Which tensor gets which type (``tensor_type``): with a quantized ``gguf_type`` (q8_0, q4_0, ...) the projections
this project quantizes with ``--quantization`` (attention q/k/v/output, the experts) take it; the token embedding
and the lm_head stay float, as ``--quantization int8|int4`` keeps them (llama.cpp's converter would quantize them
too), so a GGUF and our quantized model hold the same weights in the same places. Norms and the router are F32
(what llama.cpp's converter writes). With a float ``gguf_type`` every matrix takes it.

Not here: reading GGUF files (gguf_file.py, gguf_meta.py), the test-only K-quant block generator
(tests/checkpoint/gguf_testing.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from mixtral.checkpoint.gguf_file import gguf_specs
from mixtral.checkpoint.progress import track
from mixtral.checkpoint.specs import TensorSpec
from mixtral.checkpoint.writer import PieceSource
from mixtral.model.args import ModelArgs

if TYPE_CHECKING:
    import gguf

# What ``--gguf-type`` writes: gguf's Python quantizers cover these (the K-quants have none there).
FLOAT_GGUF_TYPES = ("f32", "f16", "bf16")
QUANT_GGUF_TYPES = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
GGUF_WRITE_TYPES = (*FLOAT_GGUF_TYPES, *QUANT_GGUF_TYPES)
# llama.cpp's ``general.file_type`` (enum llama_ftype) of a file that is mostly of one type.
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "bf16": 32}
TORCH_FLOAT_TYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
GGML_QUANT_VERSION = 2
# The GGUF names of the weights ``--quantization`` quantizes (attention projections and experts).
QUANTIZED_GGUF = (".attn_q.weight", ".attn_k.weight", ".attn_v.weight", ".attn_output.weight", "_exps.weight")
# sentencepiece piece kinds -> llama.cpp's token types (llama_token_type: normal 1, unknown 2, control 3,
# user defined 4, unused 5, byte 6).
NORMAL, UNKNOWN, CONTROL, UNUSED, BYTE = 1, 2, 3, 5, 6


def tensor_type(name: str, gguf_type: str, float_type: str) -> str:
    """The GGUF type (gguf's spelling, "Q8_0", "BF16", "F32") of tensor ``name`` in a ``gguf_type`` file whose
    unquantized matrices are ``float_type`` (see the module docstring)."""
    if name.endswith(("norm.weight", "ffn_gate_inp.weight")):
        return "F32"
    if gguf_type in QUANT_GGUF_TYPES and name.endswith(QUANTIZED_GGUF):
        return gguf_type.upper()
    return (gguf_type if gguf_type in FLOAT_GGUF_TYPES else float_type).upper()


def encode(weight: np.ndarray, kind: str) -> np.ndarray:
    """A float32 array [..., in] in the file's layout -> what ``GGUFWriter`` stores for type ``kind`` (F32 / F16
    arrays, else uint8 rows of blocks, rounded the way llama.cpp rounds: ``gguf.quants.quantize``)."""
    import gguf

    if kind == "F32":
        return np.ascontiguousarray(weight, dtype=np.float32)
    if kind == "F16":
        return np.ascontiguousarray(weight, dtype=np.float16)
    check_rows(kind, weight.shape[-1])
    return gguf.quants.quantize(np.ascontiguousarray(weight, dtype=np.float32), gguf.GGMLQuantizationType[kind])


def check_rows(kind: str, row: int, name: str = "a tensor") -> None:
    """ValueError when rows of ``row`` weights cannot be stored as ``kind`` (its blocks must divide them)."""
    import gguf

    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][0]
    if row % block:
        raise ValueError(f"{kind} stores rows in blocks of {block} weights; a row of {row} ({name}) is not a "
                         "multiple: pick another --gguf-type")


def _stored_shape(shape: tuple[int, ...], kind: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape as handed to the writer, its numpy dtype, bytes) of a ``kind`` tensor of logical ``shape``."""
    import gguf

    if kind in ("F32", "F16"):
        dtype = np.dtype(np.float32 if kind == "F32" else np.float16)
        return shape, dtype, int(np.prod(shape)) * dtype.itemsize
    byte_shape = gguf.quant_shape_to_byte_shape(shape, gguf.GGMLQuantizationType[kind])
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


# ----------------------------------------------------------------------------- metadata
def vocabulary(tokenizer_file: Path) -> tuple[list[str], list[float], list[int]]:
    """(pieces, scores, llama.cpp token types) of a sentencepiece tokenizer file, by id."""
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_file))
    except (OSError, RuntimeError) as exc:
        raise ValueError(f"{tokenizer_file} is not a sentencepiece tokenizer; GGUF files of Mixtral carry "
                         f"sentencepiece vocabularies ({exc})") from exc
    pieces, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        pieces.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        types.append(UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else BYTE if sp.is_byte(i)
                     else UNUSED if sp.is_unused(i) else NORMAL)
    return pieces, scores, types


def add_metadata(writer: gguf.GGUFWriter, args: ModelArgs, tokens: list[str], scores: list[float] | None = None,
                 token_types: list[int] | None = None, name: str | None = None, file_type: int | None = None
                 ) -> None:
    """The key/values llama.cpp needs to run ``args`` as a Mixtral (``llama`` with experts), onto a
    ``gguf.GGUFWriter`` before its header is written."""
    w = writer
    if name:
        w.add_name(name)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_dimension_count(args.head_dim)
    if args.head_dim * args.n_heads != args.dim:  # llama.cpp assumes dim / heads otherwise
        w.add_key_length(args.head_dim)
        w.add_value_length(args.head_dim)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_expert_count(args.num_experts)
    w.add_expert_used_count(args.num_experts_per_tok)
    if file_type is not None:
        w.add_file_type(file_type)
        w.add_quantization_version(GGML_QUANT_VERSION)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    if scores is not None:
        w.add_token_scores(scores)
    if token_types is not None:
        w.add_token_types(token_types)
    w.add_bos_token_id(args.bos_id)
    w.add_eos_token_id(args.eos_id)


# ----------------------------------------------------------------------------- tensors
def _model_order(args: ModelArgs) -> dict[str, int]:
    """Internal parameter -> its position in the model's parameter order (a preset's random weights are drawn in
    that order, so the pieces are read in it)."""
    from mixtral.model.mixtral import Transformer

    with torch.device("meta"):
        meta = Transformer(args)
    return {n: i for i, (n, _) in enumerate(meta.named_parameters())}


def write_order(args: ModelArgs) -> list[TensorSpec]:
    """The merged-expert GGUF specs in the model's parameter order (llama.cpp finds tensors by name)."""
    order = _model_order(args)
    return sorted(gguf_specs(args, merged_experts=True), key=lambda s: order[s.param])


def _pieces(source: PieceSource, spec: TensorSpec, args: ModelArgs) -> Iterator[torch.Tensor]:
    """The internal pieces of ``spec``, in the file's layout: one per expert for a merged ``*_exps`` tensor
    (experts are quantized one at a time), else the one piece."""
    read = source.read_key
    if spec.name.endswith("_exps.weight"):
        rows = spec.index[1:]  # w13: the w1 (gate) or w3 (up) rows of each expert; w2: the whole expert
        for e in range(args.num_experts):
            yield read((spec.param, (e, *rows)))
    else:
        yield spec.from_internal(read(spec.key))


def write_gguf(source: PieceSource, args: ModelArgs, path: Path | str, gguf_type: str = "q8_0",
               float_type: str | Callable[[TensorSpec], str] = "bf16", tokenizer_file: Path | None = None,
               name: str | None = None, progress: bool | None = None) -> Path:
    """Write the model whose pieces ``source`` gives as a GGUF file at ``path``.

    ``gguf_type``: one of GGUF_WRITE_TYPES (module docstring: which tensors it applies to). ``float_type``: the
    type ("f32", "f16", "bf16") of the matrices a quantized file keeps float, or a function of the spec (the
    source dtype of each piece). ``tokenizer_file``: the sentencepiece file whose vocabulary goes into the
    metadata (default: mistral-common's file of ``args.tokenizer``)."""
    import gguf

    from mixtral.checkpoint.tokenizer_files import packaged_tokenizer

    if gguf_type not in GGUF_WRITE_TYPES:
        raise ValueError(f"GGUF type {gguf_type!r} cannot be written; choose one of {', '.join(GGUF_WRITE_TYPES)}")
    pieces, scores, types = vocabulary(tokenizer_file or packaged_tokenizer(args.tokenizer))
    if len(pieces) != args.vocab_size:
        raise ValueError(f"the tokenizer has {len(pieces)} pieces but the model's vocabulary is {args.vocab_size}")
    specs = write_order(args)
    floats = float_type if callable(float_type) else (lambda _s, f=float_type: f)
    kinds = {s.name: tensor_type(s.name, gguf_type, floats(s)) for s in specs}
    for s in specs:  # before any file is opened
        check_rows(kinds[s.name], s.shape[-1], s.name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, "llama")
    add_metadata(writer, args, pieces, scores, types, name=name, file_type=FILE_TYPES[gguf_type])
    for s in specs:
        shape, dtype, nbytes = _stored_shape(s.shape, kinds[s.name])
        writer.add_tensor_info(s.name, shape, dtype, nbytes, raw_dtype=None if dtype != np.uint8 else
                               gguf.GGMLQuantizationType[kinds[s.name]])
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for s in track(specs, len(specs), f"writing {path.name}", progress):
            data = [encode(p.to(torch.float32).numpy(), kinds[s.name]) for p in _pieces(source, s, args)]
            writer.write_tensor_data(np.stack(data) if len(data) > 1 else data[0])
    except BaseException:
        writer.close()
        path.unlink(missing_ok=True)  # never leave a half-written file that looks like a model
        raise
    writer.close()
    return path


def convert_to_gguf(src: str | Path, dst: str | Path, gguf_type: str = "q8_0", dtype: torch.dtype | None = None,
                    *, allow_pickle: bool = False, progress: bool | None = None, seed: int = 0) -> Path:
    """Write the float model ``src`` (anything ``resolve`` accepts but a GGUF or a quantized checkpoint; a preset
    gives its random weights from ``seed``) as a ``gguf_type`` GGUF file ``dst``. ``dtype``: the type of the
    matrices kept float (default: each piece's own dtype, fp32 for a preset)."""
    from mixtral.checkpoint.loader import open_checkpoint, resolve
    from mixtral.checkpoint.quant_config import read_quant_config
    from mixtral.checkpoint.writer import RandomSource

    source = resolve(src)
    if source.format == "gguf":
        raise ValueError(f"{src} is a GGUF file already: convert reads float checkpoints (Hugging Face or Mistral)")
    if source.format == "hf" and source.folder is not None and read_quant_config(source.folder) is not None:
        raise ValueError(f"{src} is a quantized checkpoint (its config.json has a quantization_config): convert "
                         "reads float checkpoints")
    if dtype is not None and dtype not in TORCH_FLOAT_TYPES:
        raise ValueError(f"GGUF float tensors are float32, float16 or bfloat16, not {dtype}")
    name = Path(str(src)).name
    if source.format == "preset":
        rand = RandomSource(source.args, seed)
        float_type = TORCH_FLOAT_TYPES[dtype or torch.float32]
        return write_gguf(rand, source.args, dst, gguf_type, float_type, None, name, progress)
    with open_checkpoint(source, allow_pickle) as reader:
        def float_of(spec: TensorSpec) -> str:  # a merged expert tensor has expert 0's dtype
            key = (spec.param, (0, *spec.index[1:])) if spec.name.endswith("_exps.weight") else spec.key
            return TORCH_FLOAT_TYPES[dtype] if dtype is not None else TORCH_FLOAT_TYPES.get(reader.dtype_of(key), "f32")

        return write_gguf(reader, source.args, dst, gguf_type, float_of, source.tokenizer_file, name, progress)

"""Getting a model and its tokenizer for an engine: by name (through the checkpoint loader) or as a built model.

Device and dtype defaults live here: CUDA when present (bfloat16), else CPU (float32). Before anything is loaded,
the memory the model needs is checked against what the device has (``memory.check_model_fits``): a model that
cannot fit fails at once with both numbers and the ways out.
"""

from __future__ import annotations

import torch

from mixtral.defaults import DEFAULT_MODEL
from mixtral.engine.memory import MemoryProbe, check_model_fits
from mixtral.kernels.config import KernelConfig
from mixtral.model.mixtral import Transformer
from mixtral.tokenizer import Tokenizer


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_for_engine(model: str | Transformer | None, device: torch.device | str | None = None,
                    dtype: torch.dtype | str | None = None, tokenizer: Tokenizer | None = None, seed: int = 0,
                    max_model_len: int | None = None, memory_probe: MemoryProbe | None = None,
                    quantization: str | None = None, kernels: KernelConfig | None = None
                    ) -> tuple[Transformer, Tokenizer, str]:
    """(model in eval mode, its tokenizer, a display name). ``model`` is a folder, a GGUF file, preset, "demo",
    a Hugging Face repo id, None (the default model) or an already built ``Transformer`` (moved to device/dtype).

    ``quantization`` ("fp8", "int8", "int4"; None: as the checkpoint is) and ``kernels`` (the KernelConfig the
    engine runs: quantized weights are repacked for it) go to ``load_model``. ``max_model_len`` and
    ``memory_probe`` (``memory.available_memory`` by default; tests inject one) feed the pre-load memory check,
    which counts quantized bytes and raises ``InsufficientMemoryError``."""
    from mixtral.checkpoint.loader import load_model, parse_dtype, resolve
    from mixtral.checkpoint.quant_load import planned_methods, quant_spec_for
    from mixtral.model.footprint import weight_bytes

    dev = torch.device(device) if device is not None else None
    if isinstance(model, Transformer) and quantization is not None:
        raise ValueError(f"quantization={quantization!r} applies while a checkpoint loads; this model is already "
                         "built (pass its name or folder instead)")
    if isinstance(model, Transformer):
        if dev is not None or dtype is not None:
            model = model.to(device=dev or model.device, dtype=parse_dtype(dtype) if dtype is not None else None)
        tok = tokenizer or Tokenizer.from_version(model.args.tokenizer)
        return model.eval(), tok, "model"
    name = model or DEFAULT_MODEL
    dev = dev or default_device()
    torch_dtype = parse_dtype(dtype) if dtype is not None else default_dtype(dev)
    source = resolve(name)
    methods = planned_methods(source, quant_spec_for(source, quantization))  # a bad flag fails here, unallocated
    scheme = "+".join(sorted({m.name for m in methods.values()})) or None
    check_model_fits(source.args, torch_dtype, dev, name=repr(str(name)), max_model_len=max_model_len,
                     probe=memory_probe, weight_bytes=weight_bytes(source.args, torch_dtype, methods)["total"],
                     scheme=scheme)
    loaded = load_model(name, device=dev, dtype=torch_dtype, seed=seed, quantization=quantization, kernels=kernels)
    tok = tokenizer or Tokenizer.for_model(source)
    return loaded, tok, str(name)

"""What each scheme of ``mixtral bench gpu`` is held to, known before anything loads: the machine (measured copy
bandwidth and matmul rate, datasheet peaks, the memory an engine may take) and each scheme's plan.

- :class:`Machine`: the GPU's figures, measured once per run (a CPU stands in for it in tests).
- :func:`plan_scheme`: a scheme's weight bytes by part as a load allocates them (model/footprint.py, on the meta
  device: nothing is allocated), the bytes per parameter the roofline reads (``roofline.WeightFormat``), the
  KV cache's element size and the precision its prefill matmuls run in (fp8 on FP8 tensor cores, the int
  schemes in bf16). A bad ``--quantization`` for the model fails here, before any engine is built.

Not here: building and measuring engines (bench/gpu_runner.py).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from mixtral.bench import roofline


@dataclass(frozen=True)
class Machine:
    """What every scheme is measured against: the device, its copy bandwidth (bytes/s) and bf16 matmul rate
    (FLOP/s), both measured, its dense matmul peaks (FLOP/s by precision, "bf16" and "fp8") and the bytes an
    engine may take (total x utilization)."""

    device: torch.device
    name: str
    bandwidth: float
    matmul: float
    peaks: dict[str, float]
    capacity: int

    @classmethod
    def measure(cls, device: torch.device, utilization: float) -> Machine:
        """Measured copy bandwidth and matmul rate; datasheet peaks where the GPU is known, else the measured bf16
        rate (x2 for fp8)."""
        name = torch.cuda.get_device_name(device)
        bandwidth = roofline.measure_copy_bandwidth(device)
        matmul = roofline.measure_matmul_flops(device)
        bf16 = roofline.datasheet_peak(name) or matmul
        fp8 = roofline.datasheet_peak(name, "fp8") or 2 * bf16
        torch.cuda.empty_cache()  # the measurements' 4 GiB of buffers: the engines' memory checks read free memory
        total = torch.cuda.mem_get_info(device)[1]
        return cls(device, name, bandwidth, matmul, {"bf16": bf16, "fp8": fp8}, int(total * utilization))


@dataclass(frozen=True)
class SchemePlan:
    """One scheme of the run, before anything is loaded."""

    flag: str | None  # the --quantization value; None = as the checkpoint is
    label: str  # "bf16", "fp8", "int4", ...: its column in the table
    quantized: bool
    weight_bytes: dict[str, int]  # model/footprint.py's parts and total, the whole model on one GPU
    fmt: roofline.WeightFormat
    compute: str  # precision of the prefill matmuls: "fp8" or "bf16"
    dtype_bytes: int
    kv_cache_dtype: str
    kv_bytes: int  # bytes per KV element

    def describe(self) -> dict[str, Any]:
        return {"scheme": self.label, "quantization": self.flag, "quantized": self.quantized,
                "weight_bytes": self.weight_bytes,
                "bytes_per_param": dataclasses.asdict(self.fmt), "compute": self.compute,
                "kv_cache_dtype": self.kv_cache_dtype, "kv_bytes_per_element": self.kv_bytes}


def parse_schemes(text: str) -> list[str | None]:
    """``"none,fp8"`` -> ``[None, "fp8"]`` (the flag's type has validated the names)."""
    return [None if s.strip() == "none" else s.strip() for s in text.split(",") if s.strip()]


def kv_cache_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The engine keyword for ``--kv-cache-dtype`` (none for "auto", so an engine without the setting builds).
    ``cli/kv_args.py``'s ``kv_cache_kwargs`` does the same where it exists; the flag itself comes from there."""
    value = getattr(args, "kv_cache_dtype", "auto")
    return {} if value == "auto" else {"kv_cache_dtype": value}


def plan_scheme(model: str, flag: str | None, dtype: str, kv_cache_dtype: str = "auto", tp_size: int = 1,
                taken: tuple[str, ...] = ()) -> SchemePlan:
    """The plan of ``model`` under ``flag``: a bad flag or checkpoint fails here, before anything is allocated."""
    from mixtral.checkpoint.loader import parse_dtype, resolve
    from mixtral.checkpoint.quant_load import planned_methods, quant_spec_for
    from mixtral.model.footprint import weight_bytes

    source = resolve(model)
    torch_dtype = parse_dtype(dtype)
    methods = planned_methods(source, quant_spec_for(source, flag, tp_size))
    names = sorted({m.name for m in methods.values()})
    label = "+".join(names) or str(torch_dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace(
        "float16", "fp16").replace("float32", "fp32")
    if label in taken:  # "none" on an fp8 checkpoint and "fp8" are the same weights: keep both columns apart
        label = f"{label} ({flag or 'none'})"
    dtype_bytes = torch.empty((), dtype=torch_dtype).element_size()
    parts = weight_bytes(source.args, torch_dtype, methods)
    return SchemePlan(flag=flag, label=label, quantized=bool(methods), weight_bytes=parts,
                      fmt=roofline.WeightFormat.from_footprint(source.args, parts, dtype_bytes),
                      compute="fp8" if names == ["fp8"] else "bf16", dtype_bytes=dtype_bytes,
                      kv_cache_dtype=kv_cache_dtype, kv_bytes=1 if kv_cache_dtype.startswith("fp8") else dtype_bytes)

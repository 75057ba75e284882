"""A checkpoint's ``quantization_config`` (or a ``--quantization`` flag) -> a validated :class:`QuantSpec`.

Formats read here (field names as the producing libraries write them):

- compressed-tensors (``quant_method: "compressed-tensors"``, vLLM's native format, llm-compressor's output):
  ``format`` (float-quantized, pack-quantized, naive-quantized, int-quantized; a group may carry its own),
  ``config_groups`` ({name: {targets, weights, input_activations, output_activations, format}} or a preset
  name -> targets), ``ignore``, ``kv_cache_scheme``, ``sparsity_config``, ``transform_config``.
- AutoFP8 / vLLM FP8 (``quant_method: "fp8"``): ``activation_scheme`` static|dynamic, ``ignored_layers`` (or
  ``modules_to_not_convert``), ``weight_block_size`` (block FP8: not supported), ``kv_cache_scheme: "static"``.
- AWQ (``quant_method: "awq"``, AutoAWQ): ``bits``/``w_bit``, ``group_size``/``q_group_size``, ``zero_point``,
  ``version``, ``modules_to_not_convert`` (substrings of module names).
- GPTQ (``quant_method: "gptq"``, AutoGPTQ / GPTQModel): ``bits``, ``group_size`` (-1: per channel),
  ``desc_act``, ``sym``, ``checkpoint_format``, ``lm_head``, ``dynamic``.

Everything unsupported raises :class:`QuantConfigError` naming the field and its value, before any weight is
read or allocated. Not here: the tensors of each format (fp8_formats.py and the int formats' modules) and the
method objects (quant/).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mixtral.model.args import ConfigError, ModelArgs
from mixtral.quant.base import QuantSpec

# Schemes the --quantization flag can ask for on a bf16 checkpoint (quantized while loading).
FLAG_METHODS = ("fp8", "int8", "int4")
# Group sizes the int kernels take (input columns per scale); 0 (per output channel) is always accepted.
GROUP_SIZES = (32, 64, 128)
# Files older GPTQ / AWQ exports keep next to config.json instead of a quantization_config block.
SIDE_FILES = {"quantize_config.json": "gptq", "quant_config.json": "awq"}
# compressed-tensors preset scheme names a config group may be named after (targets given as a list).
_CT_PRESETS: dict[str, dict[str, Any]] = {
    "FP8": {"weights": {"num_bits": 8, "type": "float", "strategy": "tensor"},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}},
    "FP8_DYNAMIC": {"weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                    "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}},
    "W8A16": {"weights": {"num_bits": 8, "type": "int", "strategy": "group", "group_size": 128}},
    "W4A16": {"weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}},
    "W4A16_ASYM": {"weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128,
                               "symmetric": False}},
}
# What the Mixtral modules of an HF checkpoint are called, to match targets and ignore lists against.
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


class QuantConfigError(ConfigError):
    """A quantization config this project cannot load: the message names the field and its value."""


def _fail(where: str, field: str, value: Any, why: str) -> QuantConfigError:
    return QuantConfigError(f"{where}: quantization_config.{field} = {value!r} is not supported: {why}")


# --------------------------------------------------------------------------- entry points
def spec_from_flag(quantization: str) -> QuantSpec:
    """``--quantization fp8|int8|int4`` on an unquantized checkpoint: quantize while loading."""
    if quantization not in FLAG_METHODS:
        raise QuantConfigError(
            f"--quantization {quantization!r} is not a scheme this project can quantize to; choose from "
            f"{', '.join(FLAG_METHODS)} (pre-quantized AWQ, GPTQ, compressed-tensors and FP8 checkpoints are "
            "detected from their config.json)"
        )
    return QuantSpec(method=quantization, source="bf16")


def read_quant_config(folder: Path) -> tuple[dict[str, Any], str] | None:
    """The folder's quantization config and where it came from: config.json's ``quantization_config``, else
    an older export's side file (quantize_config.json: GPTQ, quant_config.json: AWQ). None when unquantized."""
    config = folder / "config.json"
    if config.is_file():
        data = _json(config)
        block = data.get("quantization_config")
        if block is not None:
            return block, f"{config}"
    for name, method in SIDE_FILES.items():
        side = folder / name
        if side.is_file():
            block = _json(side)
            block.setdefault("quant_method", method)  # these files predate quant_method
            return block, f"{side}"
    return None


def resolve_quant_spec(flag: str | None, config: Mapping[str, Any] | None,
                       where: str = "config.json") -> QuantSpec | None:
    """The one QuantSpec a load uses, from the ``--quantization`` flag and the checkpoint's config.

    No flag: the checkpoint's own (or None). A flag on an unquantized checkpoint: quantize while loading.
    A flag on a quantized checkpoint must name its method or its source format (vLLM's ``--quantization awq``
    on an AWQ checkpoint), since weights are never re-quantized from one scheme to another.
    """
    block = None if config is None else config.get("quantization_config")
    spec = None if block is None else parse_quantization_config(block, where)
    if flag is None:
        return spec
    if spec is None:
        return spec_from_flag(flag)
    aliases = {spec.method, spec.source} | ({"fp8"} if spec.method == "fp8" else set())
    if flag not in aliases:
        raise QuantConfigError(
            f"--quantization {flag!r} does not match the checkpoint, which {where} says is {spec.source} "
            f"{spec.method}; drop the flag (the checkpoint's scheme is detected) or pass "
            f"--quantization {spec.method}"
        )
    return spec


def parse_quantization_config(block: Any, where: str = "config.json") -> QuantSpec:
    """A ``quantization_config`` mapping -> QuantSpec, or QuantConfigError naming the field and value."""
    if not isinstance(block, Mapping):
        raise QuantConfigError(f"{where}: quantization_config must be an object, got {block!r}")
    method = block.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors(block, where)
    if method == "fp8":
        return _autofp8(block, where)
    if method == "awq":
        return _awq(block, where)
    if method == "gptq":
        return _gptq(block, where)
    raise _fail(where, "quant_method", method,
                "supported are 'compressed-tensors', 'fp8' (AutoFP8), 'awq' and 'gptq'")


# --------------------------------------------------------------------------- formats
def _compressed_tensors(block: Mapping[str, Any], where: str) -> QuantSpec:
    sparsity = block.get("sparsity_config")
    if sparsity and (not isinstance(sparsity, Mapping) or sparsity.get("format", "dense") != "dense"):
        raise _fail(where, "sparsity_config", sparsity, "sparse checkpoints are not supported")
    if block.get("transform_config"):
        raise _fail(where, "transform_config", "...", "rotation transforms (SpinQuant/QuIP) are not supported")
    groups = block.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise _fail(where, "config_groups", groups, "it must be a non-empty object of quantization schemes")
    default_format = block.get("format")
    schemes: dict[str, tuple[tuple[Any, ...], list[str]]] = {}
    for name, group in groups.items():
        field = f"config_groups.{name}"
        if isinstance(group, list) and name.upper() in _CT_PRESETS:  # preset name -> targets
            group = {**_CT_PRESETS[name.upper()], "targets": group}
        if not isinstance(group, Mapping):
            raise _fail(where, field, group, "a group must be a scheme object (or a known preset -> targets)")
        targets = group.get("targets")
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise _fail(where, f"{field}.targets", targets, "it must be a non-empty list of module names")
        if group.get("output_activations") is not None:
            raise _fail(where, f"{field}.output_activations", group["output_activations"],
                        "output quantization is not supported")
        fmt = group.get("format") or default_format
        key = _ct_scheme(group.get("weights"), group.get("input_activations"), fmt, where, field)
        schemes.setdefault(key, (key, []))[1].extend(targets)
    if len(schemes) > 1:
        raise _fail(where, "config_groups", sorted(groups),
                    "the groups use different schemes (mixed precision); one scheme for all layers is supported")
    (key, targets), = schemes.values()
    kind, fmt, group_size, symmetric, act_order, per_tensor, static_input = key
    return QuantSpec(
        method=kind, source="compressed-tensors", group_size=group_size, symmetric=symmetric,
        act_order=act_order, static_input_scale=static_input, ignore=_names(block.get("ignore"), where, "ignore"),
        targets=tuple(dict.fromkeys(targets)), checkpoint_format=fmt, weight_per_tensor=per_tensor,
        kv_cache_scales=_ct_kv_cache(block.get("kv_cache_scheme"), where),
    )


def _ct_scheme(weights: Any, acts: Any, fmt: Any, where: str, field: str) -> tuple[Any, ...]:
    """One compressed-tensors scheme -> (method, format, group_size, symmetric, act_order, weight per tensor,
    static input scale): the key two groups must share."""
    if not isinstance(weights, Mapping):
        raise _fail(where, f"{field}.weights", weights, "activation-only quantization is not supported")
    w = f"{field}.weights"
    wtype, bits = weights.get("type", "int"), weights.get("num_bits", 8)
    strategy = weights.get("strategy") or _strategy_from_group(weights.get("group_size"))
    if weights.get("dynamic", False):
        raise _fail(where, f"{w}.dynamic", weights["dynamic"], "weights must be quantized ahead of time")
    if wtype == "float":
        if bits != 8:
            raise _fail(where, f"{w}.num_bits", bits, "float weights must be 8-bit (FP8 e4m3)")
        if strategy not in ("tensor", "channel"):
            raise _fail(where, f"{w}.strategy", strategy, "FP8 weights take 'tensor' or 'channel' scales")
        if not weights.get("symmetric", True):
            raise _fail(where, f"{w}.symmetric", False, "FP8 weights are symmetric")
        if fmt not in ("float-quantized", "naive-quantized"):
            raise _fail(where, "format", fmt, "FP8 weights are read from the 'float-quantized' format")
        static = _ct_fp8_inputs(acts, where, f"{field}.input_activations")
        return ("fp8", fmt, 0, True, False, strategy == "tensor", static)
    if wtype != "int":
        raise _fail(where, f"{w}.type", wtype, "weights are 'int' or 'float'")
    if bits not in (4, 8):
        raise _fail(where, f"{w}.num_bits", bits, "int weights must be 4- or 8-bit")
    if acts is not None:
        raise _fail(where, f"{field}.input_activations", acts,
                    "int weights are served weight-only (W4A16 / W8A16); quantized activations (W8A8, W4A8) "
                    "are not supported")
    if fmt not in ("pack-quantized", "naive-quantized", "int-quantized"):
        raise _fail(where, "format", fmt, "int weights are read from 'pack-quantized' or 'naive-quantized'")
    if bits == 4 and fmt != "pack-quantized":
        raise _fail(where, "format", fmt, "4-bit weights are read from 'pack-quantized'")
    if strategy == "channel":
        group_size = 0
    elif strategy == "group":
        group_size = _group_size(weights.get("group_size"), where, f"{w}.group_size")
    else:
        raise _fail(where, f"{w}.strategy", strategy, "int weights take 'group' or 'channel' scales")
    actorder = weights.get("actorder")
    if actorder not in (None, False, "weight", "static", "group", "dynamic"):
        raise _fail(where, f"{w}.actorder", actorder, "expected null, 'weight' or 'group'")
    # 'group' reorders the groups (a g_idx tensor); 'weight' only changed the calibration order.
    act_order = actorder in ("group", "dynamic") and group_size > 0
    return (f"int{bits}", fmt, group_size, bool(weights.get("symmetric", True)), act_order, False, False)


def _ct_fp8_inputs(acts: Any, where: str, field: str) -> bool:
    """FP8 activations -> whether they use a static input scale. None (W8A16 FP8): quantized per token here."""
    if acts is None:
        return False
    if not isinstance(acts, Mapping):
        raise _fail(where, field, acts, "expected an object")
    if acts.get("type", "int") != "float" or acts.get("num_bits", 8) != 8:
        raise _fail(where, f"{field}.type", acts.get("type"),
                    "FP8 weights need FP8 activations (int8 activations, W8A8-int, are not supported)")
    strategy, dynamic = acts.get("strategy") or "tensor", acts.get("dynamic", False)
    if strategy == "token" and dynamic is True:
        return False
    if strategy == "tensor":
        return dynamic is not True  # static: an input_scale tensor per layer; dynamic tensor: per token here
    raise _fail(where, f"{field}.strategy", strategy, "FP8 activations are per 'token' (dynamic) or per 'tensor'")


def _ct_kv_cache(scheme: Any, where: str) -> bool:
    if scheme is None:
        return False
    if not isinstance(scheme, Mapping):
        raise _fail(where, "kv_cache_scheme", scheme, "expected an object")
    ok = (scheme.get("type") == "float" and scheme.get("num_bits") == 8 and not scheme.get("dynamic", False)
          and (scheme.get("strategy") or "tensor") == "tensor")
    if not ok:
        raise _fail(where, "kv_cache_scheme", dict(scheme),
                    "only a static per-tensor FP8 KV cache (one k_scale and v_scale per layer) is supported")
    return True


def _autofp8(block: Mapping[str, Any], where: str) -> QuantSpec:
    scheme = block.get("activation_scheme")
    if scheme not in ("static", "dynamic"):
        raise _fail(where, "activation_scheme", scheme, "expected 'static' or 'dynamic'")
    if block.get("weight_block_size") is not None:
        raise _fail(where, "weight_block_size", block["weight_block_size"],
                    "block-wise FP8 is not supported (per-tensor and per-channel scales are)")
    ignored = block.get("ignored_layers") or block.get("modules_to_not_convert")
    kv = block.get("kv_cache_scheme")
    if kv not in (None, "static"):
        raise _fail(where, "kv_cache_scheme", kv, "expected 'static' or absent")
    return QuantSpec(method="fp8", source="autofp8", static_input_scale=scheme == "static",
                     ignore=_names(ignored, where, "ignored_layers"), weight_per_tensor=True,
                     kv_cache_scales=kv == "static")


def _awq(block: Mapping[str, Any], where: str) -> QuantSpec:
    bits = _first(block, ("bits", "w_bit"))
    if bits != 4:
        raise _fail(where, "bits", bits, "AWQ checkpoints are 4-bit")
    group_size = _group_size(_first(block, ("group_size", "q_group_size")), where, "group_size")
    version = str(block.get("version") or "gemm").lower()
    if version != "gemm":
        raise _fail(where, "version", block.get("version"), "only AutoAWQ's 'gemm' packing is supported")
    zero_point = block.get("zero_point", True)
    # AWQ skips modules whose name *contains* an entry (e.g. "gate"): expressed as a regex here.
    skipped = _names(block.get("modules_to_not_convert"), where, "modules_to_not_convert")
    return QuantSpec(method="int4", source="awq", group_size=group_size, symmetric=not zero_point,
                     ignore=tuple(f"re:.*{re.escape(s)}" for s in skipped), targets=_block_linears(),
                     checkpoint_format="gemm")


def _gptq(block: Mapping[str, Any], where: str) -> QuantSpec:
    bits = block.get("bits")
    if bits not in (4, 8):
        raise _fail(where, "bits", bits, "GPTQ weights must be 4- or 8-bit")
    group_size = _group_size(block.get("group_size", -1), where, "group_size")
    fmt = block.get("checkpoint_format") or "gptq"
    if fmt not in ("gptq", "gptq_v2"):
        raise _fail(where, "checkpoint_format", fmt, "expected 'gptq' or 'gptq_v2'")
    if block.get("lm_head", False):
        raise _fail(where, "lm_head", block["lm_head"], "a quantized lm_head is not supported")
    if block.get("dynamic"):
        raise _fail(where, "dynamic", block["dynamic"], "per-module overrides are not supported")
    return QuantSpec(method=f"int{bits}", source="gptq", group_size=group_size, symmetric=bool(block.get("sym", True)),
                     act_order=bool(block.get("desc_act", False)) and group_size > 0, targets=_block_linears(),
                     checkpoint_format=fmt)


# --------------------------------------------------------------------------- helpers
def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise QuantConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise QuantConfigError(f"{path} does not hold a JSON object")
    return data


def _first(block: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    return next((block[k] for k in keys if k in block), None)


def _strategy_from_group(group_size: Any) -> str:
    """compressed-tensors' own inference when ``strategy`` is absent."""
    if group_size is None:
        return "tensor"
    return "channel" if group_size == -1 else "group"


def _group_size(value: Any, where: str, field: str) -> int:
    """-1 (or 0) -> 0 (one scale per output channel); else one of GROUP_SIZES."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, field, value, "expected an integer")
    if value in (-1, 0):
        return 0
    if value not in GROUP_SIZES:
        raise _fail(where, field, value, f"supported group sizes are {', '.join(map(str, GROUP_SIZES))} and -1")
    return value


def _names(value: Any, where: str, field: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(where, field, value, "expected a list of module names")
    return tuple(value)


def _block_linears() -> tuple[str, ...]:
    """GPTQ and AWQ quantize the linears inside the decoder layers (attention and experts), never the router
    gate or lm_head."""
    return (r"re:.*\.self_attn\.(q|k|v|o)_proj$", r"re:.*\.block_sparse_moe\.experts\.\d+\.w[123]$")


# --------------------------------------------------------------------------- modules
def matches(pattern: str, name: str) -> bool:
    """compressed-tensors' rule: ``re:`` patterns with ``re.match``, the class name ``Linear`` matches every
    linear module, anything else the exact module name."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern in ("Linear", name)


def is_quantized(spec: QuantSpec, module: str) -> bool:
    """Whether the checkpoint of ``spec`` holds linear ``module`` (an HF module name) quantized."""
    if spec.source == "bf16":
        return False
    return any(matches(t, module) for t in spec.targets) and not any(matches(i, module) for i in spec.ignore)


def quantized_params(spec: QuantSpec, args: ModelArgs) -> dict[str, bool]:
    """For every internal weight a Mixtral linear fills (as named in checkpoint/specs.py), whether the
    checkpoint holds it quantized. Pieces fused into one parameter (q/k/v -> wqkv; every expert's w1 and w3
    -> w13; every expert's w2 -> w2) must agree, else QuantConfigError: one tensor cannot be half quantized.

    The router gate (``...feed_forward.gate.weight``) and ``output.weight`` stay bf16 in the model; True for
    them means the checkpoint quantized them and the loader dequantizes them while reading.
    """
    out: dict[str, bool] = {}

    def fused(param: str, modules: list[str]) -> None:
        states = {m: is_quantized(spec, m) for m in modules}
        if len(set(states.values())) > 1:
            on = [m for m, q in states.items() if q]
            off = [m for m, q in states.items() if not q]
            raise QuantConfigError(
                f"the quantization config quantizes {on[0]} but not {off[0]}; both fill the one tensor {param} "
                f"(targets {list(spec.targets)}, ignore {list(spec.ignore)})"
            )
        out[param] = next(iter(states.values()))

    for i in range(args.n_layers):
        hf, me = f"model.layers.{i}", f"layers.{i}"
        fused(f"{me}.attention.wqkv.weight", [f"{hf}.self_attn.{p}" for p in _ATTN[:3]])
        fused(f"{me}.attention.wo.weight", [f"{hf}.self_attn.o_proj"])
        experts = [f"{hf}.block_sparse_moe.experts.{e}" for e in range(args.num_experts)]
        fused(f"{me}.feed_forward.w13", [f"{x}.{w}" for x in experts for w in ("w1", "w3")])
        fused(f"{me}.feed_forward.w2", [f"{x}.w2" for x in experts])
        fused(f"{me}.feed_forward.gate.weight", [f"{hf}.block_sparse_moe.gate"])
    fused("output.weight", ["lm_head"])
    check_shapes(spec, args)
    return out


def check_shapes(spec: QuantSpec, args: ModelArgs) -> None:
    """The group size must divide every quantized linear's input width (dim, hidden_dim and q_size)."""
    if spec.group_size:
        for field, width in (("dim", args.dim), ("hidden_dim", args.hidden_dim), ("q_size", args.q_size)):
            if width % spec.group_size:
                raise QuantConfigError(
                    f"group_size {spec.group_size} does not divide the model's {field} ({width}); the "
                    "checkpoint does not fit this config"
                )

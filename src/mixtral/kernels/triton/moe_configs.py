"""Tile configs of the fused MoE: dataclasses, the JSON files the tuners write, and the lookup.

A file ``configs/E{E}_F{F}_D{D}_{device}.json`` holds, per batch size M (tokens), the rows per block
(``block_m``, shared by both GEMMs because the align step pads to it) and each GEMM's column tile, reduction
tile, warps and pipeline stages. The lookup takes the entry whose M is nearest the call's token count; with
no file for this device it borrows another device's file for the same shape (Hopper tiles carry over), and
with none for the shape (or a 4-byte dtype, whose tiles would not fit shared memory) it falls back
to ``default_config`` (``default_sorted_config`` for the prefill GEMMs' ``sorted_`` tables). Configs were
tuned on bf16 and serve every 2-byte dtype. The tuners live in ``mixtral.bench`` (``tune_moe``,
``tune_sorted_moe``).
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class GemmConfig:
    """Launch shape of one grouped GEMM; ``split_k`` > 1 (w2 only) splits the reduction over programs;
    ``warp_specialize`` (prefill path only) asks Triton for producer/consumer warps on the K loop;
    ``persistent`` (prefill path, TMA only) launches one program per SM that walks the tiles
    (``persistent_moe.py``); ``pair_small`` (prefill w2, with ``MoEConfig.small_m``) makes each short tile span
    two column tiles, so it keeps pace with the full tiles that share its weights (``sorted_moe._tile_of``);
    ``joint`` (prefill w13, non-persistent) multiplies w1's and w3's tiles in one MMA of twice the width
    (``sorted_moe._tile``)."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1
    warp_specialize: bool = False
    persistent: bool = False
    pair_small: bool = False
    joint: bool = False


@dataclass(frozen=True)
class MoEConfig:
    """Rows per block (both GEMMs) and each GEMM's own tiles; ``small_m`` > 0 (prefill path only) gives each
    expert's last partial block of at most that many rows a smaller tile of its own (``sorted_moe.py``)."""

    block_m: int
    w13: GemmConfig
    w2: GemmConfig
    small_m: int = 0

    def to_dict(self) -> dict[str, object]:
        return {"block_m": self.block_m, "w13": asdict(self.w13), "w2": asdict(self.w2), "small_m": self.small_m}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> MoEConfig:
        return cls(int(d["block_m"]), GemmConfig(**d["w13"]), GemmConfig(**d["w2"]),  # type: ignore[arg-type]
                   int(d.get("small_m", 0)))  # type: ignore[call-overload]


def device_key(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'NVIDIA_H100_80GB_HBM3' (file-name safe)."""
    return "".join(c if c.isalnum() else "_" for c in name)


def config_path(num_experts: int, ffn_dim: int, dim: int, device_name: str, prefix: str = "") -> Path:
    """``prefix`` "sorted_" names the prefill path's table (``sorted_moe.py``, tuned by
    ``bench/tune_sorted_moe.py``)."""
    return CONFIG_DIR / f"{prefix}E{num_experts}_F{ffn_dim}_D{dim}_{device_key(device_name)}.json"


def default_config(num_tokens: int, dtype: torch.dtype) -> MoEConfig:
    """Untuned tiles: 16-row blocks for decode-sized batches (weight streaming), larger tiles as M grows."""
    if torch.empty((), dtype=dtype).element_size() >= 4:
        return MoEConfig(16, GemmConfig(32, 32, 4, 2), GemmConfig(32, 32, 4, 2))
    if num_tokens <= 32:
        return MoEConfig(16, GemmConfig(64, 128, 4, 4), GemmConfig(64, 128, 4, 4))
    if num_tokens <= 256:
        return MoEConfig(32, GemmConfig(64, 64, 4, 4), GemmConfig(64, 64, 4, 4))
    return MoEConfig(64, GemmConfig(128, 64, 8, 3), GemmConfig(128, 64, 8, 3))


def default_sorted_config(dtype: torch.dtype) -> MoEConfig:
    """Untuned tiles of the prefill GEMMs (``sorted_moe.py``): 128 x 128 x 64, 8 warps (the usual Hopper bf16
    GEMM tile); small ones for 4-byte dtypes, whose tiles would not fit shared memory."""
    if torch.empty((), dtype=dtype).element_size() >= 4:
        return MoEConfig(32, GemmConfig(32, 32, 4, 2), GemmConfig(32, 32, 4, 2))
    return MoEConfig(128, GemmConfig(128, 64, 8, 3), GemmConfig(128, 64, 8, 3))


@functools.lru_cache(maxsize=64)
def load_configs(path: Path) -> dict[int, MoEConfig] | None:
    """The file's {M: config} table, or None when there is no file."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return {int(m): MoEConfig.from_dict(c) for m, c in data["configs"].items()}


def clear_config_cache() -> None:
    """Forget the tables read so far (after the tuner writes a file, or a test points CONFIG_DIR elsewhere)."""
    load_configs.cache_clear()
    _table.cache_clear()


@functools.lru_cache(maxsize=16)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@functools.lru_cache(maxsize=64)
def _table(num_experts: int, ffn_dim: int, dim: int, device: torch.device, prefix: str) -> dict[int, MoEConfig] | None:
    """This device's tuned table for the shape, else another device's (Hopper tiles carry over), else None.
    Cached: every MoE layer of every step looks it up."""
    table = load_configs(config_path(num_experts, ffn_dim, dim, _device_name(device), prefix))
    if table is None:  # another GPU's tuning for this shape beats the untuned default
        others = sorted(CONFIG_DIR.glob(f"{prefix}E{num_experts}_F{ffn_dim}_D{dim}_*.json"))
        table = load_configs(others[0]) if others else None
    return table or None


def _tuned(num_experts: int, ffn_dim: int, dim: int, num_tokens: int, dtype: torch.dtype, device: torch.device,
           prefix: str) -> MoEConfig | None:
    """The tuned entry nearest ``num_tokens`` for this device and shape, or None: 4-byte dtypes (the tiles
    were tuned for 2-byte ones and would not fit shared memory) and untuned shapes."""
    table = _table(num_experts, ffn_dim, dim, device, prefix) if dtype.itemsize < 4 else None
    if table is None:
        return None
    return table[min(table, key=lambda m: (abs(m - num_tokens), m))]


def get_config(num_experts: int, ffn_dim: int, dim: int, num_tokens: int, dtype: torch.dtype,
               device: torch.device) -> MoEConfig:
    """Tuned config for the nearest batch size on this device and shape, else ``default_config``."""
    tuned = _tuned(num_experts, ffn_dim, dim, num_tokens, dtype, device, "")
    return tuned or default_config(num_tokens, dtype)


def get_sorted_config(num_experts: int, ffn_dim: int, dim: int, num_tokens: int, dtype: torch.dtype,
                      device: torch.device) -> MoEConfig:
    """Tiles of the prefill path (``sorted_moe.py``): tuned for the nearest token count, else its default."""
    tuned = _tuned(num_experts, ffn_dim, dim, num_tokens, dtype, device, "sorted_")
    return tuned if tuned is not None else default_sorted_config(dtype)

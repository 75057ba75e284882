"""TrainConfig: every knob of a training run, validated on construction (the CLI maps its flags onto it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from mixtral.kernels.config import KernelConfig
from mixtral.train.lora import TARGETS


@dataclass
class TrainConfig:
    """One training run. Exactly one of ``model`` (an HF folder), ``preset`` or ``model_config`` says what to train."""

    data: list[str]
    output_dir: str
    model: str | None = None
    preset: str | None = None
    model_config: str | None = None  # a config.json / params.json for a fresh random model
    tokenizer: str | None = None  # "v1", "v3" or a tokenizer file; None: the model's own (encodes .jsonl/.txt)
    seq_len: int = 512
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 100
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    aux_loss_coef: float | None = None  # None: the model config's router_aux_loss_coef
    z_loss_coef: float = 0.0
    router_jitter: float = 0.0
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("wqkv", "wo", "w13", "w2")
    merge_lora: bool = False  # also export base + adapter merged
    bf16: bool = True
    gradient_checkpointing: bool = False
    device: str = "auto"
    seed: int = 0
    init_std: float = 0.02
    eval_fraction: float = 0.02
    eval_every: int = 0
    save_every: int = 0
    log_every: int = 10
    resume: str | None = None  # a checkpoint folder, or "latest" in output_dir
    save_dtype: str = "bfloat16"
    max_shard_mb: float | None = None
    save_dataset: str | None = None
    time_limit_minutes: float | None = None
    kernels: KernelConfig = field(default_factory=KernelConfig)  # autograd always takes the PyTorch paths
    progress: bool = True
    heatmap: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sources = [s for s in (self.model, self.preset, self.model_config) if s]
        if len(sources) != 1:
            raise ValueError("give exactly one of --model (HF folder), --preset or --model-config; "
                             f"got {len(sources)}")
        if not self.data:
            raise ValueError("no training data: pass one or more --data files")
        for name in ("seq_len", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "eval_every", "save_every", "lora_rank"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.router_jitter < 1:
            raise ValueError(f"router_jitter must be in [0, 1), got {self.router_jitter}")
        if self.save_dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"save_dtype must be bfloat16, float16 or float32, got {self.save_dtype!r}")
        bad = sorted(set(self.lora_targets) - set(TARGETS))
        if bad:
            raise ValueError(f"unknown LoRA target(s) {bad}; choose from {sorted(TARGETS)}")
        # One canonical order, whatever the flag order: adapter and optimizer-state layouts then match on resume.
        self.lora_targets = tuple(t for t in TARGETS if t in self.lora_targets)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

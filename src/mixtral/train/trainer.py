"""The training loop: full fine-tuning or LoRA of a Mixtral model on packed data.

Per optimizer step: ``grad_accum`` micro-batches of ``batch_size`` windows; loss = masked next-token
cross-entropy (logits computed only at trained positions) + ``aux_loss_coef`` * load-balancing loss
(+ ``z_loss_coef`` * router z-loss), padding excluded from all of them; bf16 autocast, AdamW with linear
warm-up then cosine decay to ``min_lr_ratio * lr``, gradient clipping.

Exact resume: the batch order is a pure function of (seed, step), and checkpoints hold fp32 weights (or the
adapters), the optimizer, the scheduler and the RNG states, so a resumed run takes the same next step.
Output folder: ``checkpoint-NNNNNN/`` (resumable), ``model/`` (final HF export) or ``adapter/`` (LoRA),
``metrics.jsonl``, ``expert_load.json`` and ``expert_load.png``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mixtral.checkpoint.loader import load_model
from mixtral.checkpoint.writer import DEFAULT_MAX_SHARD_BYTES, StateDictSource, write_checkpoint
from mixtral.model.config_formats import args_from_hf_config, args_from_params_json
from mixtral.model.context import DenseContext
from mixtral.model.mixtral import Transformer, init_random_weights
from mixtral.model.presets import preset
from mixtral.train.config import TrainConfig
from mixtral.train.data import PAD, TARGET, PackedDataset, build_dataset, save_packed
from mixtral.train.lora import LoRAConfig, add_lora, load_lora_state_dict, merge_lora, save_lora
from mixtral.train.losses import expert_load, load_balancing_loss, masked_lm_loss, router_z_loss
from mixtral.train.progress import TrainProgress

STATE_FILE = "trainer_state.pt"
WARMUP_UNTIMED = 10  # first steps of a run, slowed by start-up costs, not timed
CALIBRATION_STEPS = 30  # steps timed before a time budget sets the total step count
EXPORT_RESERVE_S = 30.0  # seconds kept for the final evaluation and export
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class StepStats:
    loss: float
    lm_loss: float
    aux_loss: float
    z_loss: float
    grad_norm: float
    lr: float
    tokens: int


@dataclass
class TrainResult:
    """What a run produced: per-step stats, held-out perplexity, and where things were written."""

    steps: list[StepStats] = field(default_factory=list)
    eval_loss: float | None = None
    eval_perplexity: float | None = None
    expert_counts: torch.Tensor | None = None  # [L, E]
    output_dir: Path | None = None
    model_dir: Path | None = None
    adapter_dir: Path | None = None


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU. A CUDA device that is not there is a ValueError saying so."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r} is not a torch device: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    return device


def build_model(cfg: TrainConfig, device: torch.device) -> Transformer:
    """The model to train, in fp32 on ``device``: loaded from an HF folder, or fresh random weights."""
    if cfg.model:
        return load_model(cfg.model, device, torch.float32, progress=False).train()
    if cfg.preset:
        args = preset(cfg.preset)
    else:
        raw = json.loads(Path(cfg.model_config).read_text())  # type: ignore[arg-type]
        args = args_from_params_json(raw) if "moe" in raw else args_from_hf_config(raw)
    with torch.device(device):
        model = Transformer(args)
    init_random_weights(model, seed=cfg.seed, std=cfg.init_std)
    return model


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warm-up, then cosine decay."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_indices(step: int, micro: int, cfg: TrainConfig, n: int) -> torch.Tensor:
    """Window indices of one micro-batch: a pure function of (seed, step, micro), hence resumable."""
    per_step = cfg.batch_size * cfg.grad_accum
    first = step * per_step + micro * cfg.batch_size
    idx = torch.arange(first, first + cfg.batch_size)
    out = torch.empty_like(idx)
    for epoch in (idx // n).unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
        sel = idx // n == epoch
        out[sel] = perm[idx[sel] % n]
    return out


def forward_losses(model: Transformer, tokens: torch.Tensor, codes: torch.Tensor, aux_coef: float,
                   z_coef: float, autocast: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    """tokens/codes [B, T] -> (total loss, parts). Logits are computed only where a target follows."""
    b, t = tokens.shape
    args = model.args
    real = codes != PAD  # [B, T] padding is left out of the router losses
    predicts = torch.zeros_like(real)
    predicts[:, :-1] = codes[:, 1:] == TARGET  # position j predicts token j + 1
    targets = tokens[:, 1:][codes[:, 1:] == TARGET]  # [M]
    router_logits: list[torch.Tensor] = []
    with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=autocast):
        ctx = DenseContext(b, t, tokens.device, args.sliding_window)
        hidden = model.forward_tokens(tokens.reshape(-1), ctx, router_logits)  # [B*T, D]
        logits = model.compute_logits(hidden[predicts.reshape(-1)])  # [M, V]
    lm = masked_lm_loss(logits, targets)
    aux = load_balancing_loss(router_logits, args.num_experts, args.num_experts_per_tok, real)
    total = lm + aux_coef * aux
    z = router_z_loss(router_logits, real) if z_coef > 0 else torch.zeros((), device=lm.device)
    total = total + z_coef * z
    parts = {"lm": lm.detach(), "aux": aux.detach(), "z": z.detach(), "n_targets": targets.numel(),
             "load": expert_load(router_logits, args.num_experts_per_tok, real)}
    return total, parts


@torch.no_grad()
def evaluate(model: Transformer, ds: PackedDataset, batch_size: int, device: torch.device, autocast: bool
             ) -> tuple[float, float]:
    """Mean target-token cross-entropy over a held-out set and its perplexity."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(ds), batch_size):
        tokens = ds.tokens[start:start + batch_size].to(device)
        codes = ds.codes[start:start + batch_size].to(device)
        _, parts = forward_losses(model, tokens, codes, 0.0, 0.0, autocast)
        total += float(parts["lm"]) * parts["n_targets"]
        count += parts["n_targets"]
    model.train(was_training)
    mean = total / max(count, 1)
    return mean, math.exp(min(mean, 50.0))


class Trainer:
    """Owns the model, optimizer, data and output folder of one run; ``run()`` trains to ``max_steps``."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg, self.device)
        self.model.set_kernel_config(cfg.kernels)
        self.model.gradient_checkpointing = cfg.gradient_checkpointing
        for layer in self.model.layers:
            layer.feed_forward.jitter = cfg.router_jitter
        self.lora: LoRAConfig | None = None
        if cfg.lora_rank:
            self.lora = LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets)
            params = add_lora(self.model, self.lora)
        else:
            params = [p for p in self.model.parameters() if p.requires_grad]
        self.params = params
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=self.device.type == "cuda",
        )
        # The schedule reads self.total_steps, which a time budget may lower once the step time is known.
        self.total_steps = cfg.max_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.warmup_steps, self.total_steps, cfg.min_lr_ratio))
        self.aux_coef = self.model.args.router_aux_loss_coef if cfg.aux_loss_coef is None else cfg.aux_loss_coef
        self.autocast = cfg.bf16
        data = build_dataset(cfg.data, cfg.seq_len, cfg.tokenizer or self.model.args.tokenizer,
                             vocab_size=self.model.args.vocab_size)
        if cfg.save_dataset:
            save_packed(data, cfg.save_dataset)
        self.train_ds, self.eval_ds = data.split(cfg.eval_fraction, seed=cfg.seed) if cfg.eval_fraction else (
            data, None)
        self.step = 0
        args = self.model.args
        self.expert_counts = torch.zeros(args.n_layers, args.num_experts, dtype=torch.float64)
        if cfg.resume:
            self._resume(cfg.resume)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        folder = self.out / f"checkpoint-{self.step:06d}"
        if self.lora:
            save_lora(self.model, folder)
        else:
            self._save_model(folder, torch.float32, None)  # fp32 master weights: resume is exact
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "cpu_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "expert_counts": self.expert_counts,
            "total_steps": self.total_steps,
            "config": self.cfg.to_dict(),
        }
        torch.save(state, folder / STATE_FILE)
        return folder

    def _resume(self, where: str) -> None:
        folder = Path(where)
        if where == "latest":
            found = sorted(self.out.glob("checkpoint-*"))
            if not found:
                raise FileNotFoundError(f"--resume latest: no checkpoint-* folder in {self.out}")
            folder = found[-1]
        if not (folder / STATE_FILE).is_file():
            raise FileNotFoundError(f"{folder} is not a training checkpoint (no {STATE_FILE})")
        self._check_resume_kind(folder)
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
        if self.lora:
            from safetensors.torch import load_file

            load_lora_state_dict(self.model, {k: v.to(self.device) for k, v in
                                              load_file(str(folder / "adapter_model.safetensors")).items()})
        else:
            sd = load_model(folder, "cpu", torch.float32, progress=False).state_dict()
            with torch.no_grad():
                for name, p in self.model.state_dict().items():
                    p.copy_(sd[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["cpu_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.expert_counts = state["expert_counts"]
        self.step = int(state["step"])
        saved_max = state.get("config", {}).get("max_steps")
        if saved_max is not None and saved_max != self.cfg.max_steps:
            # A new --max-steps extends (or shortens) the run: the cosine schedule follows the new length.
            self.total_steps = self.cfg.max_steps
        else:
            # The same run continued: keep its length, which a time limit may have lowered.
            self.total_steps = int(state.get("total_steps", self.cfg.max_steps))
        if self.step >= self.total_steps:
            print(f"resumed {folder} at step {self.step}, which already reaches the run's {self.total_steps} "
                  "steps: nothing to train (pass a larger --max-steps to continue)", file=sys.stderr)

    def _check_resume_kind(self, folder: Path) -> None:
        """A LoRA checkpoint resumes only as LoRA with the same rank and targets, a full one only as full."""
        saved = folder / "adapter_config.json"
        if self.lora is None:
            if saved.is_file():
                meta = json.loads(saved.read_text())
                raise ValueError(f"{folder} is a LoRA checkpoint (rank {meta.get('rank')}, targets "
                                 f"{' '.join(meta.get('targets', []))}): resume it with those --lora-rank and "
                                 "--lora-targets")
            return
        if not saved.is_file():
            raise ValueError(f"{folder} is a full fine-tuning checkpoint: resume it without --lora-rank")
        meta = json.loads(saved.read_text())
        want = (self.lora.rank, list(self.lora.targets))
        if (meta.get("rank"), sorted(meta.get("targets", []))) != (want[0], sorted(want[1])):
            raise ValueError(f"{folder} holds LoRA adapters of rank {meta.get('rank')} on "
                             f"{' '.join(meta.get('targets', []))}, but this run asks for rank {want[0]} on "
                             f"{' '.join(want[1])}; pass the checkpoint's --lora-rank and --lora-targets")

    # ------------------------------------------------------------------ training
    def train_step(self) -> StepStats:
        """One optimizer step (``grad_accum`` micro-batches); advances ``self.step``."""
        cfg, model = self.cfg, self.model
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums = {"loss": 0.0, "lm": 0.0, "aux": 0.0, "z": 0.0}
        n_tokens = 0
        for micro in range(cfg.grad_accum):
            idx = batch_indices(self.step, micro, cfg, len(self.train_ds))
            tokens = self.train_ds.tokens[idx].to(self.device, non_blocking=True)  # [B, T]
            codes = self.train_ds.codes[idx].to(self.device, non_blocking=True)
            loss, parts = forward_losses(model, tokens, codes, self.aux_coef, cfg.z_loss_coef, self.autocast)
            (loss / cfg.grad_accum).backward()
            sums["loss"] += float(loss.detach()) / cfg.grad_accum
            for k in ("lm", "aux", "z"):
                sums[k] += float(parts[k]) / cfg.grad_accum
            self.expert_counts += parts["load"].double().cpu()
            n_tokens += int((codes != PAD).sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return StepStats(sums["loss"], sums["lm"], sums["aux"], sums["z"], float(grad_norm), lr, n_tokens)

    def run(self) -> TrainResult:
        cfg = self.cfg
        result = TrainResult(output_dir=self.out)
        metrics = (self.out / "metrics.jsonl").open("a")
        start = time.perf_counter()
        window_tokens, window_start = 0, time.perf_counter()
        first_step, calib_start = self.step, start
        with TrainProgress(self.total_steps, self.step, enabled=cfg.progress) as bar:
            while self.step < self.total_steps:
                stats = self.train_step()
                if cfg.time_limit_minutes is not None and self.step == first_step + WARMUP_UNTIMED:
                    calib_start = self._now()
                if cfg.time_limit_minutes is not None and self.step == first_step + WARMUP_UNTIMED + CALIBRATION_STEPS:
                    self._fit_time_budget(start, calib_start, bar)
                result.steps.append(stats)
                window_tokens += stats.tokens
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    tok_s = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                    window_tokens, window_start = 0, time.perf_counter()
                    record = {"step": self.step, "loss": stats.loss, "lm_loss": stats.lm_loss,
                              "aux_loss": stats.aux_loss, "z_loss": stats.z_loss, "lr": stats.lr,
                              "grad_norm": stats.grad_norm, "tok_per_s": tok_s,
                              "expert_load": self._load_shares().tolist()}
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    bar.update(self.step, stats.lm_loss, stats.aux_loss, tok_s)
                else:
                    bar.update(self.step, None, None, None)
                if cfg.eval_every and self.eval_ds is not None and self.step % cfg.eval_every == 0:
                    loss, ppl = evaluate(self.model, self.eval_ds, cfg.batch_size, self.device, self.autocast)
                    metrics.write(json.dumps({"step": self.step, "eval_loss": loss, "eval_ppl": ppl}) + "\n")
                    bar.note(f"step {self.step}: held-out loss {loss:.3f}, perplexity {ppl:.2f}")
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save_checkpoint()
                out_of_time = (cfg.time_limit_minutes is not None
                               and time.perf_counter() - start > 60 * cfg.time_limit_minutes)
                if out_of_time:
                    bar.note(f"time limit of {cfg.time_limit_minutes} min reached at step {self.step}")
                    self.save_checkpoint()
                    break
        if self.eval_ds is not None:
            result.eval_loss, result.eval_perplexity = evaluate(
                self.model, self.eval_ds, cfg.batch_size, self.device, self.autocast)
            metrics.write(json.dumps({"step": self.step, "eval_loss": result.eval_loss,
                                      "eval_ppl": result.eval_perplexity, "final": True}) + "\n")
        metrics.close()
        self._export(result)
        return result

    def _save_model(self, folder: Path, dtype: torch.dtype, max_shard_bytes: int | None) -> Path:
        """An HF checkpoint folder (config.json, safetensors, tokenizer file) through mixtral.checkpoint."""
        tok = Path(self.cfg.tokenizer or "")
        # A tokenizer given as a file is copied from there: no mistral-common needed (the GPU machine).
        return write_checkpoint(StateDictSource(self.model.state_dict()), self.model.args, folder, "hf", dtype,
                                tokenizer_file=tok if tok.is_file() else None,
                                max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES, progress=False)

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def _fit_time_budget(self, start: float, calib_start: float, bar: TrainProgress) -> None:
        """Lower total_steps so the run ends inside --time-limit-minutes; the cosine then ends where it should.

        Called once, after CALIBRATION_STEPS timed steps that follow a few untimed ones (CUDA start-up).
        Done inside the lr warm-up, every step still sees one consistent schedule.
        """
        now = self._now()
        elapsed = now - start
        per_step = (now - calib_start) / CALIBRATION_STEPS
        left = 60 * self.cfg.time_limit_minutes - elapsed - EXPORT_RESERVE_S  # type: ignore[operator]
        fits = self.step + int(max(0.0, left) / per_step)
        if fits < self.total_steps:
            self.total_steps = max(self.step, fits)
            bar.set_total(self.total_steps)
            bar.note(f"{per_step * 1000:.0f} ms/step: {self.total_steps} steps fit the time limit")

    def _load_shares(self) -> torch.Tensor:
        return self.expert_counts / self.expert_counts.sum(dim=1, keepdim=True).clamp_min(1)  # [L, E]

    def _export(self, result: TrainResult) -> None:
        cfg = self.cfg
        args = self.model.args
        result.expert_counts = self.expert_counts.clone()
        load = {"layers": args.n_layers, "experts": args.num_experts, "top_k": args.num_experts_per_tok,
                "counts": self.expert_counts.tolist(), "share": self._load_shares().tolist()}
        (self.out / "expert_load.json").write_text(json.dumps(load) + "\n")
        if cfg.heatmap:
            from mixtral.train.plots import expert_load_heatmap

            expert_load_heatmap(self.expert_counts, self.out / "expert_load.png", args.num_experts_per_tok)
        shard = int(cfg.max_shard_mb * 2**20) if cfg.max_shard_mb else None
        dtype = DTYPES[cfg.save_dtype]
        if self.lora:
            result.adapter_dir = save_lora(self.model, self.out / "adapter")
            if cfg.merge_lora:
                merge_lora(self.model)
                result.model_dir = self._save_model(self.out / "model", dtype, shard)
        else:
            result.model_dir = self._save_model(self.out / "model", dtype, shard)
        summary = {"steps": self.step, "eval_loss": result.eval_loss, "eval_perplexity": result.eval_perplexity,
                   "train": self.train_ds.stats(), "eval": self.eval_ds.stats() if self.eval_ds else None,
                   "config": cfg.to_dict()}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def train(config: TrainConfig | None = None, **kwargs: Any) -> TrainResult:
    """Train a Mixtral model: ``train(TrainConfig(...))`` or ``train(data=[...], output_dir=..., preset=...)``."""
    cfg = config if config is not None else TrainConfig(**kwargs)
    return Trainer(cfg).run()

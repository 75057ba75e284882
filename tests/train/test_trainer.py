"""The trainer: a few steps lower the loss, a resumed run takes exactly the same next steps, LoRA runs, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixtral.checkpoint.loader import load_model
from mixtral.cli.train import add_parser
from mixtral.train.config import TrainConfig
from mixtral.train.data import CONTEXT, TARGET, pack, save_packed
from mixtral.train.trainer import lr_factor, train


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small packed dataset of repeated patterns (no tokenizer needed): easy to fit in a few steps."""
    g = torch.Generator().manual_seed(0)
    docs = []
    for _ in range(48):
        start = int(torch.randint(100, 110, (1,), generator=g))
        ids = [1, *range(start, start + 12)]  # runs of consecutive ids: learnable, not memorisable at step 0
        docs.append((ids, [CONTEXT] + [TARGET] * 12))
    path = tmp_path_factory.mktemp("data") / "packed.safetensors"
    save_packed(pack(docs, seq_len=32), path)
    return path


def _cfg(data: Path, out: Path, **kw: object) -> TrainConfig:
    base = dict(data=[str(data)], output_dir=str(out), preset="tiny", batch_size=4, max_steps=6, lr=3e-3,
                warmup_steps=2, log_every=1, eval_fraction=0.1, progress=False, heatmap=False, bf16=False,
                device="cpu", save_dtype="float32")
    return TrainConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_a_few_steps_lower_the_loss(packed: Path, tmp_path: Path) -> None:
    result = train(_cfg(packed, tmp_path, max_steps=25, bf16=True, heatmap=True, router_jitter=0.01,
                        z_loss_coef=1e-3))
    losses = [s.lm_loss for s in result.steps]
    assert len(losses) == 25
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses
    assert result.eval_perplexity is not None and result.eval_perplexity < 32768
    assert all(1.0 <= s.aux_loss < 8.0 for s in result.steps)  # between balanced-ish and collapsed
    # Outputs: an HF model the project's loader reads, metrics, the expert-load heatmap.
    model = load_model(result.model_dir, "cpu", torch.float32, progress=False)
    assert model.args.n_layers == 2
    assert (tmp_path / "expert_load.png").stat().st_size > 1000
    load = json.loads((tmp_path / "expert_load.json").read_text())
    assert len(load["share"]) == 2 and len(load["share"][0]) == 8
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "aux_loss", "tok_per_s", "expert_load"} <= set(lines[0])


def test_resume_reproduces_the_next_steps(packed: Path, tmp_path: Path) -> None:
    kw = dict(router_jitter=0.05, z_loss_coef=1e-2, save_every=3)  # jitter: the RNG state must resume too
    full = train(_cfg(packed, tmp_path / "a", **kw))
    resumed = train(_cfg(packed, tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-000003"), **kw))
    assert len(resumed.steps) == 3
    for want, got in zip(full.steps[3:], resumed.steps, strict=True):
        assert got.loss == want.loss and got.grad_norm == want.grad_norm and got.lr == want.lr
    a = load_model(full.model_dir, "cpu", torch.float32, progress=False).state_dict()
    b = load_model(resumed.model_dir, "cpu", torch.float32, progress=False).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_training_keeps_the_base_and_saves_adapters(packed: Path, tmp_path: Path) -> None:
    result = train(_cfg(packed, tmp_path, lora_rank=4, lora_alpha=8, lr=1e-2, max_steps=8, merge_lora=True,
                        save_every=4))
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["rank"] == 4
    assert result.steps[-1].lm_loss < result.steps[0].lm_loss
    # The merged export differs from the base only in adapted weights.
    from mixtral.model.mixtral import Transformer, init_random_weights
    from mixtral.model.presets import preset

    base = Transformer(preset("tiny"))
    init_random_weights(base, seed=0, std=0.02)
    merged = load_model(result.model_dir, "cpu", torch.float32, progress=False).state_dict()
    for name, p in base.state_dict().items():
        adapted = name.endswith(("wqkv.weight", "wo.weight", "w13", "w2"))
        assert torch.equal(merged[name], p) != adapted, name
    resumed = train(_cfg(packed, tmp_path / "r", lora_rank=4, lora_alpha=8, lr=1e-2, max_steps=8,
                         resume=str(tmp_path / "checkpoint-000004")))
    assert [s.loss for s in resumed.steps] == [s.loss for s in result.steps[4:]]


def test_schedule_and_config_errors(packed: Path, tmp_path: Path) -> None:
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)
    with pytest.raises(ValueError, match="exactly one of --model"):
        TrainConfig(data=["x"], output_dir=str(tmp_path), preset="tiny", model="somewhere")
    with pytest.raises(ValueError, match="unknown LoRA target"):
        _cfg(packed, tmp_path, lora_rank=2, lora_targets=("wq",))


def test_cli_help_explains_every_flag() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    p = add_parser(parser.add_subparsers())
    for action in p._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help"
    out = subprocess.run([sys.executable, "-m", "mixtral.cli.train", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--lora-rank", "--aux-loss-coef", "--z-loss-coef", "--router-jitter", "--resume",
                 "--gradient-checkpointing", "--save-dataset"):
        assert flag in out


def test_gradient_checkpointing_takes_the_same_steps(packed: Path, tmp_path: Path) -> None:
    plain = train(_cfg(packed, tmp_path / "p", max_steps=2))
    ckpt = train(_cfg(packed, tmp_path / "c", max_steps=2, gradient_checkpointing=True))
    for a, b in zip(plain.steps, ckpt.steps, strict=True):
        assert b.loss == pytest.approx(a.loss, rel=1e-5) and b.grad_norm == pytest.approx(a.grad_norm, rel=1e-4)

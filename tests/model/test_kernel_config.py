"""Kernel choice in one place: ``KernelConfig`` refuses bad values at construction (listing the allowed ones),
``Kernels`` settles the choice once, the model hands one ``Kernels`` to every layer, the engine applies
``EngineConfig.kernels``, the CLI flags map onto the config, and no call reads an environment variable."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from mixtral.cli.kernel_args import add_kernel_args, kernel_config_from_args
from mixtral.engine.config import EngineConfig
from mixtral.kernels import cpu_ops, dispatch
from mixtral.kernels.config import KernelConfig
from mixtral.kernels.dispatch import Kernels
from mixtral.kernels.moe_grouped import moe_grouped
from mixtral.kernels.reference import moe_reference
from mixtral.model.mixtral import Transformer, init_random_weights
from mixtral.model.moe import MoE
from mixtral.model.presets import preset


@pytest.mark.parametrize(("field", "value", "allowed"), [
    ("backend", "cuda", "auto, triton, reference"),
    ("moe_prefill", "grouped_mm", "sorted, persistent, triton"),
])
def test_bad_choice_lists_the_allowed_values(field: str, value: str, allowed: str) -> None:
    with pytest.raises(ValueError, match=f"{field}='{value}' is not one of {allowed}"):
        KernelConfig(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["dense_prefill", "fused_gate", "pdl"])
def test_switches_must_be_booleans(field: str) -> None:
    with pytest.raises(ValueError, match=f"{field} must be True or False, got '0'"):
        KernelConfig(**{field: "0"})  # type: ignore[arg-type]


def test_engine_config_holds_a_kernel_config() -> None:
    assert EngineConfig().kernels == KernelConfig()
    assert EngineConfig(kernels=KernelConfig(pdl=False)).kernels.pdl is False
    with pytest.raises(ValueError, match="kernels must be a KernelConfig"):
        EngineConfig(kernels={"backend": "reference"})  # type: ignore[arg-type]


def test_cli_flags_map_onto_the_config() -> None:
    p = argparse.ArgumentParser()
    add_kernel_args(p)
    assert kernel_config_from_args(p.parse_args([])) == KernelConfig()
    args = p.parse_args(["--kernel-backend", "reference", "--moe-prefill", "persistent", "--no-dense-prefill",
                         "--no-fused-gate", "--no-pdl"])
    assert kernel_config_from_args(args) == KernelConfig(backend="reference", moe_prefill="persistent",
                                                         dense_prefill=False, fused_gate=False, pdl=False)
    assert kernel_config_from_args(argparse.Namespace()) == KernelConfig()  # a namespace built in code
    help_text = p.format_help()
    for flag in ("--kernel-backend", "--moe-prefill", "--no-dense-prefill", "--no-fused-gate", "--no-pdl"):
        assert flag in help_text


def test_cli_refuses_a_bad_choice(capsys: pytest.CaptureFixture[str]) -> None:
    p = argparse.ArgumentParser()
    add_kernel_args(p)
    with pytest.raises(SystemExit):
        p.parse_args(["--kernel-backend", "cuda"])
    err = capsys.readouterr().err
    assert "--kernel-backend: invalid choice: 'cuda'" in err
    assert all(name in err for name in ("auto", "triton", "reference"))


def test_triton_backend_needs_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(ValueError, match="needs the triton package"):
        Kernels(KernelConfig(backend="triton"))
    auto = Kernels(KernelConfig())  # auto without Triton: the PyTorch paths, also on CUDA tensors
    assert not auto._cuda and not auto._cpu


def test_backend_decides_where_triton_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    cpu = torch.zeros(1)
    assert not Kernels(KernelConfig()).triton_on(cpu)  # auto: CUDA tensors only
    assert Kernels(KernelConfig())._cuda
    assert Kernels(KernelConfig(backend="triton")).triton_on(cpu)  # the interpreter tests
    assert not Kernels(KernelConfig(backend="reference"))._cuda
    assert Kernels(KernelConfig()).graph_safe(torch.device("cuda"))
    assert not Kernels(KernelConfig(backend="reference")).graph_safe(torch.device("cuda"))
    assert not Kernels(KernelConfig()).graph_safe(torch.device("cpu"))


def test_triton_backend_on_a_cpu_model_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    model = Transformer(preset("tiny"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="kernel backend 'triton' needs a CUDA device"):
        model.set_kernel_config(KernelConfig(backend="triton"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model.set_kernel_config(KernelConfig(backend="triton"))
    assert model.kernels.config.backend == "triton"


def test_one_dispatch_reaches_every_layer() -> None:
    model = Transformer(preset("tiny-odd"), kernels=KernelConfig(backend="reference", fused_gate=False))
    holders = [m for m in model.modules() if hasattr(m, "kernels")]
    # the model, per block: the block, two norms, attention, MoE; and the final norm
    assert len(holders) == 1 + 5 * model.args.n_layers + 1
    assert all(m.kernels is model.kernels for m in holders)
    assert model.kernels.config == KernelConfig(backend="reference", fused_gate=False)
    model.set_kernel_config(KernelConfig())
    assert all(m.kernels is model.kernels for m in holders) and model.kernels.config == KernelConfig()


def test_moe_experts_fallback_follows_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where Triton does not run the experts take the grouped path, or the reference with that backend."""
    grouped = Kernels(KernelConfig())._moe_fallback
    assert grouped.func is moe_grouped and grouped.keywords == {"linear": cpu_ops.expert_linear}
    assert Kernels(KernelConfig(backend="reference"))._moe_fallback is moe_reference
    calls: list[str] = []
    layer = MoE(preset("tiny"), layer_idx=0)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.1)
    layer.kernels = Kernels(KernelConfig(backend="reference"))
    monkeypatch.setattr(layer.kernels, "_moe_fallback", lambda *a: calls.append("ref") or moe_reference(*a))
    out, logits = layer(torch.randn(5, 64))
    assert calls == ["ref"] and out.shape == (5, 64) and logits.shape == (5, 8)


def test_engine_applies_its_kernel_config() -> None:
    """The model runner gives the model EngineConfig.kernels once, at construction."""
    from mixtral.engine.llm_engine import LLMEngine

    model = Transformer(preset("tiny"))
    init_random_weights(model, seed=0, std=0.2)
    engine = LLMEngine.from_config(model.eval(), device="cpu", kv_cache_bytes=1 << 22,
                                   kernels=KernelConfig(backend="reference", pdl=False))
    assert engine.model_runner.model.kernels.config == KernelConfig(backend="reference", pdl=False)
    assert engine.model_runner.model.layers[0].feed_forward.kernels is engine.model_runner.model.kernels
    engine.shutdown()


class _Env(dict):
    """os.environ stand-in that records every key Python code reads."""

    def __init__(self, base: dict[str, str]) -> None:
        super().__init__(base)
        self.read: list[str] = []

    def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
        self.read.append(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.read.append(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.read.append(str(key))
        return super().__contains__(key)


def test_no_environment_variable_is_read_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward pass through every op of the dispatch reads no MIXTRAL_ variable (nor TRITON_INTERPRET):
    the choice was made when the config was applied."""
    model = Transformer(preset("tiny-odd"))
    init_random_weights(model, seed=0, std=0.1)
    model.set_kernel_config(KernelConfig())
    env = _Env(dict(os.environ))
    monkeypatch.setattr(os, "environ", env)
    with torch.inference_mode():
        model(torch.randint(0, 100, (2, 5)))
        k = model.kernels
        q = torch.randn(3, 4, 8)
        k.dense_prefill_attention(q.half(), q[:, :2].half(), q[:, :2].half(), [3])
        k.route_topk(torch.randn(3, 8), 2)
    ours = [key for key in env.read if key.startswith(("MIXTRAL", "TRITON_INTERPRET"))]
    assert ours == []

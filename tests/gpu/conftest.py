"""Fixtures of the GPU test suite: the CUDA device, the kernel modules, the dispatch and kernel choice, model builders.

Every module here sets ``pytestmark = pytest.mark.gpu``; pyproject's addopts deselect that marker, so the
default ``python -m pytest`` never runs them. On a CUDA machine: ``python -m pytest -m gpu`` (README, "GPU
tests"). Without a GPU the ``cuda`` fixture fails each test with a message: the suite is never skipped into
passing.

Two things happen once, before the first GPU test runs (the ``cuda`` fixture):
- ``TRITON_F32_DEFAULT=ieee``: fp32 ``tl.dot`` in IEEE precision, not TF32, so fp32 kernels can be held to the
  reference at 1e-4 and the fp32 engine to the reference path token for token.
- The Triton kernel modules are re-imported compiled if the CPU kernel tests' conftest (tests/kernels) imported
  them under the interpreter while pytest collected the whole tree.

Test modules never import a Triton kernel module at collection: they take the ``kernels`` fixture (the kernel
modules) or a ``Kernels`` dispatch (``mixtral.kernels.dispatch``, which imports its kernels only when a call
needs them). Pytest collects tests/gpu before tests/kernels, and a compiled import of ``triton.language`` ahead
of that folder's conftest (which switches Triton's interpreter on) would leave the CPU kernel tests calling
compiled language functions (tests/unit/test_gpu_suite_collects.py holds this).

Tests that need several GPUs carry ``@pytest.mark.gpus(n)``; with fewer CUDA devices than ``n`` they are
deselected at collection (listed in the run's header), neither run nor counted, so ``python -m pytest -m gpu``
on a one-GPU machine reports only what that machine can test.

Implementations are chosen as the product chooses them, by a ``KernelConfig`` (backend, prefill MoE path, dense
prefill attention, fused router, PDL): ``kernel_ops`` is the default config's dispatch, ``kernel_choice`` gives a
config to an engine or a bare model; a kernel called directly takes PDL on or off by its ``pdl=`` argument.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from mixtral.kernels.config import KernelConfig
from mixtral.kernels.dispatch import Kernels
from mixtral.model.args import ModelArgs
from mixtral.model.mixtral import Transformer, init_random_weights
from mixtral.model.presets import preset

# Kernel modules in dependency order: a module that imports a @triton.jit function by name from another
# (pdl_enter, attend_tile) or a config class must be reloaded after it.
_KERNEL_MODULES_FIRST = ["pdl", "attention_tile", "moe_configs", "moe_align", "moe_sum", "moe_glue", "persistent_moe"]


def _interpreted_kernel_modules() -> list[str]:
    """Names of loaded ``mixtral.kernels.triton`` modules holding a kernel built for Triton's interpreter."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # a Triton without the interpreter cannot have built one
        return []
    return [name for name, mod in list(sys.modules.items())
            if name.startswith("mixtral.kernels.triton.") and mod is not None
            and any(isinstance(v, InterpretedFunction) for v in vars(mod).values())]


def _compiled_kernels() -> None:
    """Re-import the Triton kernel modules compiled when collection left interpreted ones behind (reloading a
    module keeps its namespace, so functions imported from it elsewhere see the compiled kernels)."""
    if not _interpreted_kernel_modules():
        return
    prefix = "mixtral.kernels.triton."
    loaded = sorted(n[len(prefix):] for n in sys.modules if n.startswith(prefix))
    order = [m for m in _KERNEL_MODULES_FIRST if m in loaded] + [m for m in loaded if m not in _KERNEL_MODULES_FIRST]
    for name in order:
        importlib.reload(sys.modules[prefix + name])
    left = _interpreted_kernel_modules()
    assert not left, f"Triton kernels still built for the interpreter after reloading: {left}"


def _cuda_device_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.hookimpl(trylast=True)  # after ``-m``/``-k`` chose: only tests that would run are counted
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the tests marked ``gpus(n)`` when this machine has fewer than n CUDA devices."""
    needs = {item: item.get_closest_marker("gpus") for item in items}
    needs = {item: int(m.args[0]) for item, m in needs.items() if m is not None}
    if not needs:
        return
    have = _cuda_device_count()
    left_out = [item for item, n in needs.items() if n > have]
    if not left_out:
        return
    items[:] = [item for item in items if item not in left_out]
    config.hook.pytest_deselected(items=left_out)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"tests/gpu: {len(left_out)} test(s) need more than the {have} CUDA GPU(s) here, "
                            "deselected:")
        for item in left_out:
            reporter.write_line(f"  {item.nodeid} (gpus({needs[item]}))")


@pytest.fixture(scope="session")
def cuda() -> torch.device:
    """The CUDA device every GPU test runs on; fails (never skips) where there is none."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.fail("TRITON_INTERPRET=1 is set: the GPU tests need compiled Triton kernels; unset it")
    if not torch.cuda.is_available():
        pytest.fail("tests/gpu need a CUDA GPU (run them with `python -m pytest -m gpu` on a GPU machine)")
    os.environ["TRITON_F32_DEFAULT"] = "ieee"
    _compiled_kernels()
    return torch.device("cuda")


KERNEL_MODULES = ["fused_moe", "gate_router", "paged_attention", "pdl", "rmsnorm", "rope", "router", "skinny_gemm",
                  "sorted_moe", "write_kv"]


@pytest.fixture(scope="session")
def kernels(cuda: torch.device) -> SimpleNamespace:
    """The Triton kernel modules (``kernels.fused_moe.fused_moe``, ``kernels.rmsnorm.rms_norm``, ...), imported
    compiled when the first test needs them."""
    return SimpleNamespace(**{n: importlib.import_module(f"mixtral.kernels.triton.{n}") for n in KERNEL_MODULES})


@pytest.fixture
def gen(cuda: torch.device, request: pytest.FixtureRequest) -> torch.Generator:
    """A CUDA generator seeded from the test's name: each test draws its own reproducible inputs."""
    return torch.Generator(device=cuda).manual_seed(sum(map(ord, request.node.name)) % 100_003)


@pytest.fixture(autouse=True)
def _free_gpu_memory() -> Iterator[None]:
    """Return each test's tensors to the GPU (the MoE tests hold GBs of 8x22B weights), a failed test's too:
    pytest keeps the last failure for post-mortem debugging (``sys.last_traceback``), and its frames would hold
    that test's models, engines and KV caches into every later test."""
    yield
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if getattr(sys, name, None) is not None:
            setattr(sys, name, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------- kernel choice

@pytest.fixture(scope="session")
def kernel_ops(cuda: torch.device) -> Kernels:
    """The dispatch of the default ``KernelConfig()``, the one the engine runs: its methods (``rms_norm``,
    ``moe_experts``, ``dense_prefill_attention``, ...) are the ops as a model calls them."""
    return Kernels(KernelConfig())


@contextlib.contextmanager
def _kernel_choice(model: Transformer | None = None, **choices: Any) -> Iterator[KernelConfig]:
    """``KernelConfig(**choices)`` for the body (its fields: ``backend``, ``moe_prefill``, ``dense_prefill``,
    ``fused_gate``, ``pdl``; a field not named keeps the default the engine runs). A bad name or value fails
    at once, from the config's own validation.

    - an engine built in the body: ``LLMEngine.from_config(..., kernels=cfg)``; its model runner gives the
      engine's model the config (leave ``model`` out: the engine owns its model);
    - a bare model: name it, and its forward passes in the body run with the config; the config it had comes
      back when the body ends, also when it fails;
    - the dispatch alone: ``Kernels(cfg)``.
    """
    cfg = KernelConfig(**choices)
    if model is None:
        yield cfg
        return
    saved = model.kernels.config
    model.set_kernel_config(cfg)
    try:
        yield cfg
    finally:
        model.set_kernel_config(saved)


@pytest.fixture(scope="session")
def kernel_choice() -> Callable[..., contextlib.AbstractContextManager[KernelConfig]]:
    """``with kernel_choice(model_or_None, backend=..., moe_prefill=..., dense_prefill=..., fused_gate=...,
    pdl=...) as cfg:`` (see ``_kernel_choice``)."""
    return _kernel_choice


# ----------------------------------------------------------------- models

@pytest.fixture(scope="session")
def tiny_args() -> ModelArgs:
    """The ``tiny`` preset: 2-wide everything, real vocabulary (32768), 8 experts top-2."""
    return preset("tiny")


@pytest.fixture(scope="session")
def mid_args() -> ModelArgs:
    """Mixtral's attention and MoE layout scaled down: head_dim 128, 4 query heads per KV head, 8 experts
    top-2, four layers."""
    return ModelArgs(dim=1024, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=128, hidden_dim=2048,
                     vocab_size=32768, max_seq_len=4096, tokenizer="v3")


@pytest.fixture(scope="session")
def build_model() -> Callable[..., Transformer]:
    """``build_model(args, std, seed=0)``: random weights N(0, std) on the CPU in fp32, eval mode (the engine
    moves a copy to the GPU). A std large enough that greedy choices are not coin flips: 0.1 for ``tiny``,
    0.05 for the mid model."""
    def build(args: ModelArgs, std: float, seed: int = 0) -> Transformer:
        model = Transformer(args)
        init_random_weights(model, seed=seed, std=std)
        return model.eval()

    return build


"""Fixtures of the GPU test suite: the CUDA device, tolerances, model builders, and the one kernel-choice switch.

Every module here sets ``pytestmark = pytest.mark.gpu``; pyproject's addopts deselect that marker, so the
default ``python -m pytest`` never runs them. On a CUDA machine: ``python -m pytest -m gpu`` (README, "GPU
tests"). Without a GPU the ``cuda`` fixture fails each test with a message: the suite is never skipped into
passing.

Two things happen once, before the first GPU test runs (the ``cuda`` fixture):
- ``TRITON_F32_DEFAULT=ieee``: fp32 ``tl.dot`` in IEEE precision, not TF32, so fp32 kernels can be held to the
  reference at 1e-4 and the fp32 engine to the reference path token for token.
- The Triton kernel modules are re-imported compiled if the CPU kernel tests' conftest (tests/kernels) imported
  them under the interpreter while pytest collected the whole tree.

Test modules never import a Triton kernel module at collection: they take the ``kernels`` fixture. Pytest
collects tests/gpu before tests/kernels, and a compiled import of ``triton.language`` ahead of that folder's
conftest (which switches Triton's interpreter on) would leave the CPU kernel tests calling compiled language
functions (tests/unit/test_gpu_suite_collects.py holds this).

``kernel_choice`` is the only place these tests choose implementations (backend, prefill MoE path, dense
prefill attention, fused router, PDL); everything else calls the ops as the engine does.
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

from mixtral.model.args import ModelArgs, preset
from mixtral.model.mixtral import Transformer, init_random_weights

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
    """Return each test's tensors to the GPU (the MoE tests hold GBs of 8x22B weights)."""
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------- kernel choice

BACKENDS = ("auto", "triton", "reference")
MOE_PREFILL = ("sorted", "persistent", "triton")


@contextlib.contextmanager
def _kernel_choice(model: Transformer | None = None, *, backend: str = "auto", moe_prefill: str = "sorted",
                   dense_prefill: bool = True, fused_gate: bool = True, pdl: bool = True
                   ) -> Iterator[dict[str, Any]]:
    """Run the body with these kernel choices (the names of ``KernelConfig``'s fields); yields the keyword
    arguments an ``LLMEngine`` built inside the body needs to get the same choices.

    - ``backend``: ``auto`` (Triton on CUDA), ``triton``, or ``reference`` (the PyTorch reference for every op);
    - ``moe_prefill``: the prefill-sized MoE path, ``sorted`` (the table's tiles, persistent where the table
      says), ``persistent`` or ``triton`` (the decode kernel at every size);
    - ``dense_prefill``: cuDNN attention for fresh prompts; ``fused_gate``: the one-kernel router; ``pdl``:
      programmatic dependent launch.

    ``model``, when given, gets the matching experts path for its own forward; its previous one comes back
    afterwards. Implemented with the MIXTRAL_* environment variables the ops read today.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: use one of {', '.join(BACKENDS)}")
    if moe_prefill not in MOE_PREFILL:
        raise ValueError(f"moe_prefill={moe_prefill!r}: use one of {', '.join(MOE_PREFILL)}")
    if moe_prefill == "persistent":
        raise ValueError("moe_prefill='persistent' is not selectable through the environment variables; "
                         "test persistent tiles by passing their config to sorted_moe")
    env = {
        "MIXTRAL_KERNELS": "reference" if backend == "reference" else None,
        "MIXTRAL_MOE_PREFILL": moe_prefill,
        "MIXTRAL_DENSE_PREFILL": None if dense_prefill else "0",
        "MIXTRAL_FUSED_GATE": None if fused_gate else "0",
        "MIXTRAL_PDL": None if pdl else "0",
    }
    saved_env = {k: os.environ.get(k) for k in env}
    saved_paths = [layer.feed_forward.experts_fn for layer in model.layers] if model is not None else []
    try:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if model is not None:
            model.set_moe_path("reference" if backend == "reference" else "triton")
        yield {}
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if model is not None:
            for layer, fn in zip(model.layers, saved_paths, strict=True):
                layer.feed_forward.experts_fn = fn


@pytest.fixture(scope="session")
def kernel_choice() -> Callable[..., contextlib.AbstractContextManager[dict[str, Any]]]:
    """``with kernel_choice(model_or_None, backend=..., moe_prefill=..., dense_prefill=..., fused_gate=...,
    pdl=...) as engine_kwargs:`` (see ``_kernel_choice``)."""
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


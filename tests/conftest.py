"""Shared fixtures: tiny random-weight checkpoints on disk, in both formats, written once per session.

``tiny_hf_checkpoint`` and ``tiny_consolidated_checkpoint`` hold the SAME weights (the consolidated copy is
converted from the HF one): preset ``tiny`` (v3 tokenizer, 32768 ids, GQA 4/2 heads, 8 experts), fp32,
``init_random_weights(seed=TINY_SEED, std=TINY_STD)`` — std 0.1 so routing and next tokens are decisive.
Each folder ships ``tokenizer.model.v3`` copied from mistral-common's package data. Treat them as read-only.

Under CI (``CI`` set) hypothesis runs derandomized: the property tests still explore, but the same examples each
run, so a landing never hinges on a lucky draw. Locally they draw fresh examples every run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

TINY_PRESET = "tiny"
TINY_SEED = 0
TINY_STD = 0.1


@pytest.fixture
def single_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread: on a busy 2-core box OpenMP's thread wake-ups cost ~20x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with config.json, model.safetensors (fp32) and tokenizer.model.v3 of the `tiny` preset."""
    from mixtral.checkpoint.writer import save_checkpoint
    from mixtral.model.mixtral import Transformer, init_random_weights
    from mixtral.model.presets import preset

    args = preset(TINY_PRESET)
    model = Transformer(args)
    init_random_weights(model, seed=TINY_SEED, std=TINY_STD)
    return save_checkpoint(model, args, tmp_path_factory.mktemp("tiny_hf"), "hf")


@pytest.fixture(scope="session")
def tiny_consolidated_checkpoint(tiny_hf_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with params.json, consolidated.safetensors (fp32) and tokenizer.model.v3: the HF weights."""
    from mixtral.checkpoint.writer import convert_checkpoint

    return convert_checkpoint(tiny_hf_checkpoint, tmp_path_factory.mktemp("tiny_consolidated"), "mistral")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the tests marked ``native_cpu(variant)`` (they run that build of the native CPU kernels; default
    the AVX2 one, which every build's CPU also runs) on a CPU without its instruction set or a machine without a
    C compiler (.ci/run installs one), listed in the run's header: neither run nor counted, as tests/gpu does
    with ``gpus(n)``."""
    import shutil

    from mixtral.kernels.cpu_native import VARIANTS, cpu_flags

    have = cpu_flags()
    compiler = shutil.which("cc") or shutil.which("gcc")
    left_out = []
    for item in items:
        mark = item.get_closest_marker("native_cpu")
        if mark is None:
            continue
        name = mark.args[0] if mark.args else "avx2"
        variant = next(v for v in VARIANTS if v.name == name)
        missing = [f for f in variant.cpu_flags if f not in have] + ([] if compiler else ["a C compiler (cc)"])
        if missing:
            left_out.append((item, name, missing))
    if not left_out:
        return
    items[:] = [item for item in items if item not in {i for i, _, _ in left_out}]
    config.hook.pytest_deselected(items=[i for i, _, _ in left_out])
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        for item, name, missing in left_out:
            reporter.write_line(f"deselected {item.nodeid}: the native CPU kernel's {name} build needs "
                                f"{', '.join(missing)}, which this machine lacks")

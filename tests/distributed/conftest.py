"""Fixtures of the tensor-parallel tests: one torch thread per process, and no orphan process after any test.

Every test here must leave no child process behind except the workers of a group that a module-scoped fixture
still holds (they are reaped, and checked, when that fixture ends).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tp_testing import LAYOUTS, assert_reaped, child_pids

from mixtral.distributed.executor import DistributedExecutor


@pytest.fixture(autouse=True)
def _one_torch_thread(single_torch_thread: None) -> None:
    """Workers take the driver's thread count: one each on the 2-core CI box (tests/conftest.py says why)."""


@pytest.fixture(autouse=True)
def _no_orphans() -> Iterator[None]:
    before = child_pids()
    yield
    active = DistributedExecutor._active
    held = set(active.worker_pids) if active is not None and active.healthy else set()
    assert_reaped(child_pids() - before - held)


@pytest.fixture(scope="session", params=list(LAYOUTS))
def executor(request: pytest.FixtureRequest, tiny_hf_checkpoint: Path) -> Iterator[DistributedExecutor]:
    """A group over the tiny checkpoint for each layout, shared by every test of that layout (pytest runs them
    together and stops the group before starting the next)."""
    torch.set_num_threads(1)
    ex = DistributedExecutor.start(str(tiny_hf_checkpoint), LAYOUTS[request.param], "cpu", "fp32")
    yield ex
    pids = set(ex.worker_pids)
    ex.shutdown()
    assert_reaped(pids)

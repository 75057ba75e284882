"""The GPU test suite (tests/gpu) collects on a CPU machine without importing Triton.

Pytest collects tests/gpu before tests/kernels. If a GPU test module imported ``triton.language`` at collection,
it would be built for compiled kernels before tests/kernels' conftest switches Triton's interpreter on, and the
CPU kernel tests would fail calling compiled language functions (``tl.sigmoid``) from interpreted kernels. So
the GPU tests take their kernel modules from a fixture at run time; this holds them to it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GPU_TESTS = ROOT / "tests" / "gpu"


def test_gpu_test_modules_import_without_triton() -> None:
    modules = sorted(p.stem for p in GPU_TESTS.glob("*.py"))
    assert {"conftest", "gpu_testing", "test_gpu_engine", "test_gpu_moe"} <= set(modules)
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m == 'triton' or m.startswith('triton.'))\n"
        "assert not loaded, loaded[:5]\n"
        "print('ok')\n"
    )
    env = dict(os.environ)
    # tests/ too: the root conftest puts it on sys.path (shared helpers such as block_table_testing live there)
    env["PYTHONPATH"] = os.pathsep.join([str(GPU_TESTS), str(ROOT / "tests"), str(ROOT / "src"),
                                         env.get("PYTHONPATH", "")])
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_every_gpu_test_module_is_marked_gpu() -> None:
    """The default run deselects the marker; a module without it would run (and fail) on a CPU machine."""
    for path in GPU_TESTS.glob("test_*.py"):
        assert "pytestmark = pytest.mark.gpu" in path.read_text(), f"{path.name} is not marked gpu"

"""Running a compile check (``python -m mixtral.kernels.triton.<module>``) in a subprocess for the compile tests.

A subprocess because the test process imported the kernels in interpreter mode (conftest): an interpreted
kernel is never compiled. A plain module; fixtures are in the test files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def compile_cases(module: str, arch: int, out: Path, timeout: float = 900) -> dict[str, dict[str, object]]:
    """Run ``mixtral.kernels.triton.<module> --arch <arch> --json <out>`` (its own Triton cache beside ``out``);
    its cases by name."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(out.parent / "cache"), TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    proc = subprocess.run([sys.executable, "-m", f"mixtral.kernels.triton.{module}", "--arch", str(arch),
                           "--json", str(out)], env=env, capture_output=True, text=True, timeout=timeout)
    assert out.exists(), f"{module} wrote nothing:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return {c["case"]: c for c in json.loads(out.read_text())["cases"]}

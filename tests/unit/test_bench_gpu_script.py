"""scripts/gpu_run.sh, checked without a GPU through its dry run: every benchmark it would start is a valid
``mixtral bench gpu`` command line, the time limits fit the device tool's 10-minute calls, and the test run covers
every tests/gpu file that one GPU can run (the multi-GPU ones only where there are enough GPUs)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from mixtral.bench import gpu
from mixtral.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_run.sh"


def _dry(tmp_path: Path, mode: str, gpus: int, gib: int) -> list[list[str]]:
    env = {**os.environ, "OUT": str(tmp_path), "GPU_RUN_DRY": "1", "GPU_RUN_GPUS": str(gpus),
           "GPU_RUN_GIB": str(gib), "MIXTRAL_COMMIT": "test"}
    done = subprocess.run(["bash", str(SCRIPT), mode], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return [shlex.split(line[len("DRY: "):]) for line in done.stdout.splitlines() if line.startswith("DRY: ")]


def test_help_and_bad_mode() -> None:
    done = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.startswith("Usage: scripts/gpu_run.sh tests")
    assert "gpu_run.sh tests    about" in done.stdout and "gpu_run.sh bench    about" in done.stdout
    bad = subprocess.run(["bash", str(SCRIPT), "everything"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "Usage:" in bad.stderr
    wheels = subprocess.run(["bash", str(ROOT / "scripts" / "device_wheels.sh"), "--help"], capture_output=True,
                            text=True, timeout=30)
    assert wheels.returncode == 0 and wheels.stdout.startswith("Usage: scripts/device_wheels.sh")


@pytest.mark.parametrize(("gib", "names"), [(79, ["fp8_full", "int4_8x22b", "bf16_fp8_16l", "int4_8x7b"]),
                                             (139, ["fp8_full", "int4_8x22b", "int4_8x7b"])])
def test_every_benchmark_is_a_valid_command_within_the_call(tmp_path: Path, gib: int, names: list[str]) -> None:
    commands = _dry(tmp_path, "bench", 1, gib)
    assert [Path(c[c.index("--json") + 1]).stem.removeprefix("bench_") for c in commands] == names
    parser = build_parser("bench")
    total = 0
    for cmd in commands:
        assert cmd[:4] == ["timeout", "-s", "INT", "-k"] and cmd[6:10] == ["python3", "-m", "mixtral.cli.main",
                                                                           "bench"]
        total += int(cmd[5])
        args = parser.parse_args(cmd[9:])  # bench gpu FLAGS...
        assert gpu.arg_problem(args) is None, cmd
        assert str(args.json).startswith(str(tmp_path))
    assert total <= 640  # each capped at what is left of the 570 s budget as well
    full = parser.parse_args(commands[0][9:])
    assert (full.model, full.quantization, full.layers) == ("mixtral-8x7b", "none,fp8", None)
    assert (full.offline, full.offline_requests, full.max_num_seqs) == ("128:128", 2048, 512)
    assert full.batch_sizes == "1,8,32,64,128,256"
    big = parser.parse_args(commands[1][9:])
    assert (big.model, big.quantization, big.batch_sizes, big.layers) == ("mixtral-8x22b", "int4", "1", None)
    small = parser.parse_args(commands[-1][9:])
    assert (small.model, small.quantization, small.batch_sizes) == ("mixtral-8x7b", "int4", "1,64")


@pytest.mark.parametrize("gpus", [1, 2, 4])
def test_the_test_run_covers_tests_gpu(tmp_path: Path, gpus: int) -> None:
    (cmd,) = _dry(tmp_path, "tests", gpus, 79)
    assert cmd[6:10] == ["python3", "-m", "pytest", "-m"] and "--junitxml=" + str(tmp_path / "gpu_junit.xml") in cmd
    files = [a for a in cmd if a.startswith("tests/gpu/") and "::" not in a]
    every = sorted(f"tests/gpu/{p.name}" for p in (ROOT / "tests" / "gpu").glob("test_*.py"))
    assert sorted(files) == every  # the multi-GPU file too: tests/gpu/conftest.py deselects what cannot run here
    assert files[0] == "tests/gpu/test_quantized_model_gpu.py"
    assert "--deselect" not in cmd


def test_every_multi_gpu_test_is_marked_with_its_gpu_count() -> None:
    """What tests/gpu/conftest.py deselects on a smaller machine: a multi-GPU test without ``gpus(n)`` would run
    on one GPU and fail."""
    distributed = (ROOT / "tests" / "gpu" / "test_distributed_gpu.py").read_text()
    tests = re.findall(r"^((?:@.*\n)*)def (test_\w+)\(", distributed, re.M)
    assert len(tests) >= 4
    for decorators, name in tests:
        assert re.search(r"@pytest\.mark\.gpus\([24]\)", decorators), name
    routing = (ROOT / "tests" / "gpu" / "test_gpu_routing.py").read_text()
    assert re.search(r"^@pytest\.mark\.gpus\(2\).*\ndef test_tp2_routing_equals_one_gpu\(", routing, re.M)


def test_the_64k_prompt_bench_runs_only_when_named(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "GPU_RUN_DRY": "1", "GPU_RUN_GPUS": "1", "GPU_RUN_GIB": "139"}
    done = subprocess.run(["bash", str(SCRIPT), "bench", "int4_8x22b_64k"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("DRY: ")]
    args = build_parser("bench").parse_args(shlex.split(line[len("DRY: "):])[9:])
    assert gpu.arg_problem(args) is None
    assert (args.model, args.quantization, args.context, args.prefill_len) == ("mixtral-8x22b", "int4", 64000, 65000)
    assert args.context + args.decode_steps + 16 <= 65536 and args.prefill_len + 8 <= 65536  # the model's context

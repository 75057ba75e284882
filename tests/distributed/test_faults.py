"""Faults: a worker that dies (killed, out of memory) is reported by rank, within seconds, never a hang; the
driver's own death or SIGTERM leaves no worker behind.

Each test runs a TP 2 driver in its own process (tp_driver.py), so the process's exit status and stderr are
what a supervisor would see. Times are measured from the fault to the driver's exit.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tp_testing import assert_reaped

DRIVER = Path(__file__).with_name("tp_driver.py")
# The subprocesses import this checkout's package (as the test process does through PYTHONPATH or the install).
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    p for p in (str(Path(__file__).resolve().parents[2] / "src"), os.environ.get("PYTHONPATH")) if p)}
DEADLINE_S = 15.0  # a generous bound on a loaded 2-core box; the measured times are printed


class Driver:
    def __init__(self, mode: str, checkpoint: Path, *extra: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(DRIVER), mode, str(checkpoint), *extra],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=ENV)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise AssertionError(f"the driver did not start: {self.proc.stderr.read()}")  # type: ignore[union-attr]
        self.info = json.loads(line)
        self.workers: list[int] = self.info["workers"]

    def wait(self, timeout: float) -> tuple[int, str, float]:
        """(exit status, stderr, seconds waited)."""
        t0 = time.monotonic()
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            pytest.fail(f"the driver was still running {timeout:.0f}s after the fault; stderr:\n{err[-3000:]}")
        return self.proc.returncode, err, time.monotonic() - t0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def drivers() -> Iterator[list[Driver]]:
    started: list[Driver] = []
    yield started
    for d in started:
        d.kill()
        assert_reaped({d.proc.pid}, timeout=5)
        _assert_gone(d.workers)


def _assert_gone(pids: list[int], timeout: float = 10.0) -> None:
    """The workers (grandchildren of the test) are gone: not running, not zombies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if _running(p)]
        if not alive:
            return
        time.sleep(0.1)
    for p in alive:
        os.kill(p, signal.SIGKILL)
    pytest.fail(f"worker processes {alive} outlived their driver by {timeout:.0f}s")


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_killed_worker_mid_step_raises_naming_the_rank(drivers: list[Driver], tiny_hf_checkpoint: Path) -> None:
    d = Driver("steps", tiny_hf_checkpoint)
    drivers.append(d)
    time.sleep(1.0)  # generating
    killed_at = time.time()
    os.kill(d.workers[0], signal.SIGKILL)
    code, err, waited = d.wait(DEADLINE_S)
    raised_at = float(err.split("raised at ")[1].split()[0])
    print(f"killed worker mid-step: the step raised after {raised_at - killed_at:.2f}s, driver exited {code} after "
          f"{waited:.2f}s")
    assert raised_at - killed_at < 5.0
    assert code != 0
    assert "WorkerFailedError" in err and "rank 1" in err and "killed by signal 9" in err, err[-2000:]
    _assert_gone(d.workers)


def test_killed_worker_exits_the_process_when_asked(drivers: list[Driver], tiny_hf_checkpoint: Path) -> None:
    """exit_on_worker_failure: an idle group notices a dead worker by itself and exits with status 1."""
    d = Driver("idle", tiny_hf_checkpoint, "--exit-on-failure")
    drivers.append(d)
    os.kill(d.workers[0], signal.SIGKILL)
    code, err, waited = d.wait(DEADLINE_S)
    print(f"killed idle worker: driver exited {code} after {waited:.2f}s")
    assert code == 1
    assert "tensor-parallel worker rank 1" in err and "exiting" in err, err[-2000:]


def test_worker_out_of_memory_is_reported(drivers: list[Driver], tiny_hf_checkpoint: Path) -> None:
    """A worker whose allocation fails (its address space capped below what a forward pass needs, as a full host
    would) dies with its message reaching the driver's error."""
    d = Driver("forward", tiny_hf_checkpoint)
    drivers.append(d)
    pid = d.workers[0]
    vm = int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if line.startswith("VmSize")).split()[1]) * 1024
    resource.prlimit(pid, resource.RLIMIT_AS, (vm + (64 << 20), resource.RLIM_INFINITY))
    d.proc.stdin.write("go\n")  # type: ignore[union-attr]
    d.proc.stdin.flush()  # type: ignore[union-attr]
    code, err, waited = d.wait(DEADLINE_S + 30)
    print(f"worker out of memory: driver exited {code} after {waited:.2f}s")
    assert code != 0
    assert "WorkerFailedError" in err and "rank 1" in err, err[-2000:]
    assert "memory" in err.lower() or "allocate" in err.lower(), err[-2000:]


def test_server_reports_unhealthy_then_exits(drivers: list[Driver], tiny_hf_checkpoint: Path) -> None:
    d = Driver("serve", tiny_hf_checkpoint, "--exit-on-failure")
    drivers.append(d)
    url = f"http://127.0.0.1:{d.info['port']}"
    _wait_healthy(url)
    os.kill(d.workers[0], signal.SIGKILL)
    t0 = time.monotonic()
    seen: list[int | str] = []
    while d.proc.poll() is None and time.monotonic() - t0 < DEADLINE_S:
        try:
            seen.append(httpx.get(f"{url}/health", timeout=1).status_code)
        except httpx.HTTPError:
            seen.append("down")
        time.sleep(0.05)
    code, err, _waited = d.wait(5)
    print(f"server: /health answered {seen[:3]}...{seen[-3:]}, exited {code} {time.monotonic() - t0:.2f}s after")
    assert code == 1
    assert "tensor-parallel worker rank 1" in err, err[-2000:]
    assert 503 in seen, seen  # unhealthy before it exits
    assert 200 not in seen[seen.index(503):], seen


def test_sigterm_stops_the_server_and_every_worker(drivers: list[Driver], tiny_hf_checkpoint: Path) -> None:
    d = Driver("serve", tiny_hf_checkpoint, "--exit-on-failure")
    drivers.append(d)
    _wait_healthy(f"http://127.0.0.1:{d.info['port']}")
    d.proc.send_signal(signal.SIGTERM)
    code, err, waited = d.wait(DEADLINE_S)
    print(f"SIGTERM: server exited {code} after {waited:.2f}s")
    assert code == 0, err[-2000:]
    _assert_gone(d.workers, timeout=2)


def test_workers_leave_when_the_driver_is_killed(drivers: list[Driver], tiny_hf_checkpoint: Path) -> None:
    d = Driver("idle", tiny_hf_checkpoint)
    drivers.append(d)
    t0 = time.monotonic()
    d.kill()
    _assert_gone(d.workers, timeout=5)
    print(f"driver killed: workers gone after {time.monotonic() - t0:.2f}s")


def test_a_setup_failure_names_every_rank(drivers: list[Driver], tiny_hf_checkpoint: Path) -> None:
    """A KV cache no rank can allocate: the error lists each rank's out-of-memory message; nothing hangs."""
    code = (
        "import torch\n"
        "from mixtral.distributed.config import ParallelConfig\n"
        "from mixtral.distributed.engine import build_parallel_engine\n"
        "from mixtral.engine.llm_engine import LLMEngine\n"
        "torch.set_num_threads(1)\n"
        f"build_parallel_engine(LLMEngine, {str(tiny_hf_checkpoint)!r}, ParallelConfig(2, collective_timeout_s=60), "
        "device='cpu', dtype='fp32', max_model_len=256, num_kv_blocks=10**9)\n"
    )
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    print(f"setup failure: exited {proc.returncode} after {time.monotonic() - t0:.2f}s")
    assert proc.returncode != 0
    assert "allocating 1000000000 KV blocks failed on 2 of 2 rank(s)" in proc.stderr, proc.stderr[-2000:]
    assert "rank 0:" in proc.stderr and "rank 1:" in proc.stderr


def _wait_healthy(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    pytest.fail(f"{url}/health never answered 200")

"""The worker processes a driver starts on its own host: spawning them, joining the group while watching them
start, reaping them, and reading a dead worker's last words.

Each worker is ``python -m mixtral.distributed.worker`` with its rank, the driver's rendezvous store, the driver's
pid (it exits when the driver is gone) and the write end of a pipe for the message of the error that kills it.
Not here: what a dead worker means for the group (executor.py).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from mixtral.distributed.config import ParallelConfig
from mixtral.distributed.errors import WorkerFailedError
from mixtral.distributed.groups import DistributedInit, ProcessGroups, init_process_groups

STOP_WAIT_S = 10.0  # workers get this long to leave after STOP before they are killed


@dataclass
class WorkerProcess:
    rank: int
    proc: subprocess.Popen[bytes]
    error_read_fd: int

    def last_words(self) -> str:
        """The message the worker wrote before dying ("" if none)."""
        try:
            return os.read(self.error_read_fd, 4000).decode(errors="replace").strip()
        except OSError:  # nothing written (non-blocking), or already closed
            return ""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.error_read_fd)


def spawn_worker(rank: int, parallel: ParallelConfig, port: int, device_type: str) -> WorkerProcess:
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    cmd = [sys.executable, "-m", "mixtral.distributed.worker", "--rank", str(rank),
           "--world-size", str(parallel.world_size), "--master-addr", "127.0.0.1", "--master-port", str(port),
           "--device-type", device_type, "--timeout", str(parallel.collective_timeout_s),
           "--parent-pid", str(os.getpid()), "--error-fd", str(write_fd)]
    try:
        proc = subprocess.Popen(cmd, pass_fds=(write_fd,), stdin=subprocess.DEVNULL)
    finally:
        os.close(write_fd)
    return WorkerProcess(rank, proc, read_fd)


def join_watching(init: DistributedInit, device_type: str, parallel: ParallelConfig, store: dist.Store,
                  workers: list[WorkerProcess]) -> ProcessGroups:
    """Join the group as rank 0 while watching the workers start: one that dies first is reported at once
    instead of being waited for until the rendezvous times out."""
    result: dict[str, Any] = {}

    def join() -> None:
        try:
            result["groups"] = init_process_groups(init, device_type, parallel.collective_timeout_s, store=store)
        except BaseException as exc:  # handed to the caller below
            result["error"] = exc

    t = threading.Thread(target=join, daemon=True, name="mixtral-join")
    t.start()
    while t.is_alive():
        t.join(0.1)
        dead = [w for w in workers if w.proc.poll() is not None]
        if dead and t.is_alive():
            w = dead[0]
            words = w.last_words()
            raise WorkerFailedError(f"tensor-parallel worker rank {w.rank} (pid {w.proc.pid}) exited with status "
                                    f"{w.proc.returncode} while starting" + (f": {words}" if words else ""))
    if "error" in result:
        raise result["error"]
    return result["groups"]


def reap(workers: list[WorkerProcess], kill: bool) -> None:
    """Wait for the workers to exit (after STOP), killing any still there after ``STOP_WAIT_S``; or kill now."""
    deadline = time.monotonic() + (0.0 if kill else STOP_WAIT_S)
    for w in workers:
        if w.proc.poll() is not None:
            continue
        with contextlib.suppress(subprocess.TimeoutExpired):
            w.proc.wait(max(0.0, deadline - time.monotonic()))
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()

"""Real ``mixtral serve`` processes for the serve tests (a plain module; fixtures are in conftest.py).

``serve_process`` starts one on a free 127.0.0.1 port over a checkpoint and waits until ``/health`` answers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2 as httpx

from mixtral.serve.inprocess import free_port


@contextmanager
def serve_process(checkpoint: Path, *extra: str, script: list[str] | None = None) -> Iterator[tuple[Any, str]]:
    """``mixtral serve checkpoint`` (or ``script``) on CPU at a 256-token context, info logs, no access log,
    then ``extra`` (a flag repeated there wins); yields (process, base URL) once healthy, within 90 s. The
    process is killed on the way out if it still runs."""
    port = free_port()
    args = [str(checkpoint), "--port", str(port), "--served-model-name", "tiny-mixtral", "--device", "cpu",
            "--max-model-len", "256", "--kv-cache-bytes", str(4 << 20), "--log-level", "info", "--no-access-log",
            *extra]
    cmd = [sys.executable, *(script or ["-m", "mixtral.cli.main", "serve"]), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()

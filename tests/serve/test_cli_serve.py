"""``mixtral serve`` refuses what it cannot serve with one line on stderr and status 1, not a traceback."""

from __future__ import annotations

from typing import Any

from mixtral.cli import serve
from mixtral.cli.main import build_parser
from mixtral.serve.inprocess import free_port


def test_kv_budget_below_one_sequence_is_a_clean_error(capsys: Any) -> None:
    # 64 KiB of KV cache cannot hold one 256-token sequence of the tiny model: the engine refuses to start.
    # serve binds its socket before loading: a free loopback port, so this runs as any user.
    args = build_parser("serve").parse_args(["serve", "tiny", "--device", "cpu", "--max-model-len", "256",
                                             "--kv-cache-bytes", str(1 << 16), "--host", "127.0.0.1",
                                             "--port", str(free_port())])
    assert serve.run(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("mixtral serve: cannot load 'tiny'") and "kv_cache_bytes=65536" in err, err
    assert "Traceback" not in err

"""`mixtral serve`'s engine flags reach the engine it builds."""

from __future__ import annotations

import pytest

from mixtral.cli.main import build_parser
from mixtral.cli.serve import load_engine


@pytest.mark.parametrize(("flags", "want_async"), [([], False), (["--no-async-scheduling"], False)])
def test_engine_flags(flags: list[str], want_async: bool) -> None:
    args = build_parser("serve").parse_args(
        ["serve", "tiny", "--device", "cpu", "--kv-cache-bytes", str(1 << 22), "--enforce-eager", *flags])
    engine = load_engine(args)
    # On CPU async scheduling defaults off (nothing to overlap); the flag forces it off anywhere.
    assert engine._overlap is want_async
    assert engine.config.enforce_eager is True
    assert engine.config.async_scheduling is (False if flags else None)

"""``mixtral serve`` with an engine bug injected, for the lifecycle tests (never imported by the product).

    python serve_with_engine_bug.py N <mixtral serve arguments...>

runs ``mixtral serve`` whose engine raises ``RuntimeError("injected engine bug")`` from its N-th ``step()``: the
engine loop dies as it would on a real bug, and the test checks that the process exits non-zero.
"""

from __future__ import annotations

import sys
from typing import Any

from mixtral.cli.main import main
from mixtral.engine.llm_engine import LLMEngine


def inject_step_failure(fail_at: int) -> None:
    real_step = LLMEngine.step
    calls = {"n": 0}

    def step(self: LLMEngine, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise RuntimeError("injected engine bug")
        return real_step(self, *args, **kwargs)

    LLMEngine.step = step  # type: ignore[method-assign]


if __name__ == "__main__":
    inject_step_failure(int(sys.argv[1]))
    sys.exit(main(["serve", *sys.argv[2:]]))

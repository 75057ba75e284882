"""``mixtral bench gpu``'s offline figure on CPU with the demo model: the warm-up requests run first and
are not counted, so tok/s covers exactly the timed requests' tokens."""

from __future__ import annotations

import pytest

from mixtral.bench import gpu
from mixtral.engine.llm_engine import LLMEngine


@pytest.mark.parametrize("warmup", [True, False])
def test_offline_counts_only_the_timed_requests(warmup: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "_sync", lambda: None)  # CPU: nothing to wait for
    engine = LLMEngine.from_config("demo", device="cpu", dtype="fp32", max_model_len=64, max_num_seqs=8,
                                   max_num_batched_tokens=64)
    admitted: list[str] = []
    add = engine.add_request
    monkeypatch.setattr(engine, "add_request", lambda rid, *a, **k: (admitted.append(rid), add(rid, *a, **k)))
    r = gpu.bench_offline(engine, engine.model_args, n=3, in_len=12, out_len=5, warmup=warmup)
    assert [a[0] for a in admitted] == ["w"] * 3 * warmup + ["o"] * 3  # warm-up first, then the timed ones
    assert r["output_tok_s"] * r["seconds"] == pytest.approx(3 * 5)  # the warm-up's tokens are not counted
    assert r["total_tok_s"] * r["seconds"] == pytest.approx(3 * (12 + 5))
    assert not engine.has_unfinished_requests()

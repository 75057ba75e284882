"""``mixtral bench gpu``'s offline and prefill figures on CPU with the demo model: the warm-up requests run
first and are not counted, so tok/s covers exactly the timed requests' tokens; the rested prefill idles
before each timed run, outside its timing."""

from __future__ import annotations

import pytest

from mixtral.bench import gpu_measure
from mixtral.engine.llm_engine import LLMEngine


@pytest.mark.parametrize("warmup", [True, False])
def test_offline_counts_only_the_timed_requests(warmup: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = LLMEngine.from_config("demo", device="cpu", dtype="fp32", max_model_len=64, max_num_seqs=8,
                                   max_num_batched_tokens=64)
    admitted: list[str] = []
    add = engine.add_request
    monkeypatch.setattr(engine, "add_request", lambda rid, *a, **k: (admitted.append(rid), add(rid, *a, **k)))
    r = gpu_measure.bench_offline(engine, engine.model_args, n=3, in_len=12, out_len=5, warmup=warmup)
    assert [a[0] for a in admitted] == ["w"] * 3 * warmup + ["o"] * 3  # warm-up first, then the timed ones
    assert r["output_tok_s"] * r["seconds"] == pytest.approx(3 * 5)  # the warm-up's tokens are not counted
    assert r["total_tok_s"] * r["seconds"] == pytest.approx(3 * (12 + 5))
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("rest", [0.0, 1.5])
def test_rested_prefill_idles_before_each_timed_run_outside_the_clock(rest: float,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """With a rest the GPU idles before every timed prefill (not before the warm-up) and the idle time is not
    counted: a fake clock that only the idle advances must read no time for the prefill itself."""
    engine = LLMEngine.from_config("demo", device="cpu", dtype="fp32", max_model_len=64, max_num_seqs=8,
                                   max_num_batched_tokens=64)
    events: list[str] = []
    clock = [0.0]

    def sleep(seconds: float) -> None:
        events.append(f"idle {seconds}")
        clock[0] += seconds

    add, step = engine.add_request, engine.step
    monkeypatch.setattr(gpu_measure.time, "sleep", sleep)
    monkeypatch.setattr(gpu_measure.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(engine, "add_request", lambda rid, *a, **k: (events.append(rid), add(rid, *a, **k)))
    monkeypatch.setattr(engine, "step", lambda: (events.append("step"), step())[1])
    seconds = gpu_measure.bench_prefill(engine, engine.model_args, length=20, repeats=2, rest_s=rest)
    assert seconds == 0.0  # the clock moved only while idle, which the timing leaves out
    idle = [f"idle {rest}"] if rest else []
    assert [e for e in events if e != "step"] == ["p0", "p1", *idle, "p2", *idle]  # the warm-up p0 runs at once
    assert events.index("p1") > events.index("step")  # each prompt is prefilled before the next is added
    assert not engine.has_unfinished_requests()

"""The engine's host-side fast paths: list-to-tensor packing, the block tables' device-scatter updates, the
frozen startup heap, and the host-overhead probe that measures them."""

from __future__ import annotations

import argparse
import gc
import json
import random
from pathlib import Path

import pytest
import torch
from block_table_testing import random_table_batches
from engine_testing import assert_no_leaks, random_prompts, run_to_completion

from mixtral.bench import host_overhead, throughput
from mixtral.bench.host_timing import PHASES, StepTimer
from mixtral.engine.block_tables import BlockTables
from mixtral.engine.config import EngineConfig
from mixtral.engine.host_tensors import host_tensor
from mixtral.engine.llm_engine import LLMEngine
from mixtral.engine.model_runner import ModelRunner
from mixtral.engine.sampler import Sampler
from mixtral.engine.scheduler import ScheduledSequence
from mixtral.engine.sequence import Sequence
from mixtral.model.mixtral import Transformer
from mixtral.sampling import SamplingParams
from mixtral.tokenizer import Tokenizer


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32, torch.float64])
def test_host_tensor_equals_torch_tensor(dtype: torch.dtype) -> None:
    values = [3, -7, 0, 2**31 - 1, True] if not dtype.is_floating_point else [0.5, -1.25, 3.0, 1e-3]
    got = host_tensor(values, dtype)
    assert got.dtype == dtype and torch.equal(got, torch.tensor(values, dtype=dtype))
    assert host_tensor([], dtype).shape == (0,)
    with pytest.raises(OverflowError):
        host_tensor([2**63], torch.int64)


class DevicePathTables(BlockTables):
    """The CUDA path on the CPU: (row, column, block) updates and index_put_, never the numpy view (which
    ``_alloc`` sets up again each time the table grows, possibly halfway through a gather)."""

    def _alloc(self, rows: int) -> None:
        super()._alloc(rows)
        self._np = None


def test_block_tables_scatter_updates_equal_the_sequences_tables() -> None:
    """The CUDA path (new entries scattered into the table on the device) run on the CPU, against the tables."""
    rng = random.Random(1)
    tables = DevicePathTables(max_blocks_per_seq=10, device=torch.device("cpu"), initial_rows=2)
    for batch in random_table_batches(tables, rng, 150, seqs=3, max_blocks=10, block_ids=500, grow=1, reset=3):
        got = tables.gather(batch)
        for row, s in zip(got.tolist(), batch, strict=True):
            assert row[: len(s.block_table)] == s.block_table


@pytest.mark.parametrize("how", ["finish", "abort", "shutdown"])
def test_heap_is_frozen_exactly_while_the_engine_has_requests(tiny_model: Transformer, how: str) -> None:
    assert gc.get_freeze_count() == 0
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=64, max_model_len=128, freeze_gc_heap=True))
    try:
        assert gc.get_freeze_count() == 0  # idle
        engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
        engine.add_request("b", [8, 9], SamplingParams(max_tokens=5, ignore_eos=True))
        assert gc.get_freeze_count() > 0
        if how == "finish":
            while engine.has_unfinished_requests():
                assert gc.get_freeze_count() > 0
                engine.step()
        elif how == "abort":
            engine.step()
            engine.abort_request("a")
            assert gc.get_freeze_count() > 0  # "b" still runs
            engine.abort_request("b")
        else:
            engine.step()
            engine.shutdown()
        assert gc.get_freeze_count() == 0
    finally:
        engine.shutdown()
        while engine.has_unfinished_requests():
            engine.abort_request(list(engine._groups))
    # Off by default on the CPU.
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=64, max_model_len=128))
    engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=2))
    assert gc.get_freeze_count() == 0
    engine.abort_request("a")
    engine.shutdown()


def _args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    host_overhead.add_arguments(parser)
    return parser.parse_args(["--num-prompts", "24", "--input-len", "20", "--output-len", "6", "--max-num-seqs", "8",
                              "--max-num-batched-tokens", "64", "--tokenizer", "v3", *extra])


@pytest.mark.parametrize("stream", [False, True])
def test_host_overhead_runs_the_real_engine_and_times_every_phase(stream: bool) -> None:
    args = _args(*(["--stream"] if stream else []))
    res = host_overhead.measure(8, args, progress=False)
    assert res["output_tokens"] == 24 * 6 and res["preemptions"] == 0
    every = res["all_steps_ms"]
    # The phases partition the step: their sum is the step's time (wait is 0 on the CPU).
    assert sum(every[p] for p in PHASES) == pytest.approx(every["wall"], rel=1e-6)
    assert every["wait"] == 0 and every["host"] == pytest.approx(every["wall"])
    for phase in ("schedule", "plan", "prepare", "apply", "stops", "outputs"):
        assert every[phase] > 0, phase
    assert 0 < every["ahead"] < 1  # decode steps launched ahead, admissions not
    assert res["decode_steps_ms"]["steps"] > 0 and res["prefill_steps_ms"]["steps"] > 0


def test_step_timer_counts_what_the_engine_returns(tiny_model: Transformer) -> None:
    engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=64, max_model_len=128, async_scheduling=True))
    timer = StepTimer.attach(engine)
    engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True))
    finished = []
    calls = 0
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
        calls += 1
    timer.close()
    engine.shutdown()
    assert [len(o.outputs[0].token_ids) for o in finished] == [4]
    assert len(timer.records) == calls == engine.get_stats().num_steps  # the last call launches nothing new
    # The first call launches the prompt and the first decode step ahead of it; the last, nothing.
    assert [r.num_prefill_tokens for r in timer.records] == [3, 0, 0, 0]
    assert [r.launched_ahead for r in timer.records] == [True, True, True, False]


def test_mixed_input_ids_scatter_device_rows_among_host_chunks(tiny_model: Transformer) -> None:
    config = EngineConfig(num_kv_blocks=64, max_model_len=256).resolve(tiny_model.args.max_seq_len)
    runner = ModelRunner(tiny_model, config, Sampler(tiny_model.args.vocab_size))
    a = Sequence("a", 0, [11, 12, 13], 3, SamplingParams(), 0.0)
    b = Sequence("b", 0, list(range(100, 200)), 100, SamplingParams(), 0.0)  # a long chunk: sliced, not listed
    b.prompt_tensor = torch.tensor(b.token_ids)
    c = Sequence("c", 0, [7, 8], 2, SamplingParams(), 0.0)
    a.num_computed_tokens, b.num_computed_tokens, c.num_computed_tokens = 3, 10, 0
    scheduled = [ScheduledSequence(a, 1), ScheduledSequence(b, 70), ScheduledSequence(c, 2)]
    sampled = torch.tensor([900, 901, 902, 903])
    ids = runner._mixed_input_ids(scheduled, sampled, [3, -1, -1])
    assert ids.tolist() == [903, *range(110, 180), 7, 8]
    assert b.prompt_tensor.tolist() == list(range(100, 200))  # the scatter wrote a copy


def test_admissions_and_prompt_chunks_go_ahead_without_changing_outputs(tiny_model: Transformer,
                                                                         tokenizer: Tokenizer) -> None:
    """More requests than seats, prompts longer than the step budget: with async scheduling the steps that
    admit requests and continue prompts are launched ahead too, and every request's tokens are the synchronous
    engine's."""
    prompts = random_prompts(10, 5, 60, seed=31)
    params = [SamplingParams(temperature=0.0 if i % 2 else 0.8, seed=i, max_tokens=4 + 3 * i, ignore_eos=True)
              for i in range(10)]
    outputs = {}
    for async_scheduling in (False, True):
        engine = LLMEngine(tiny_model, EngineConfig(num_kv_blocks=256, max_model_len=128, max_num_seqs=4,
                                                    max_num_batched_tokens=24, block_size=4,
                                                    async_scheduling=async_scheduling), tokenizer)
        timer = StepTimer.attach(engine)
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            engine.add_request(f"r{i}", prompt, p)
        done = run_to_completion(engine, lambda e: e.block_manager.check_invariants())
        timer.close()
        assert_no_leaks(engine)
        engine.shutdown()
        outputs[async_scheduling] = {rid: o.outputs[0].token_ids for rid, o in done.items()}
        if async_scheduling:
            # After the first step every step was launched ahead, prompt-carrying ones included.
            assert all(r.launched_ahead for r in timer.records[:-1])
            assert sum(r.num_prefill_tokens > 0 and r.num_scheduled > 1 for r in timer.records[1:]) >= 5
            assert engine.get_stats().num_prompt_tokens == sum(len(p) for p in prompts)
    assert outputs[True] == outputs[False]


def test_bench_throughput_reports_host_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    throughput.add_arguments(parser)
    args = parser.parse_args(["--num-prompts", "6", "--input-len", "12", "--output-len", "5", "--max-model-len", "64",
                              "--kv-cache-bytes", str(1 << 22), "--json", str(tmp_path / "out.json"),
                              "--report-host-time"])
    assert throughput.run(args) == 0
    host = json.loads((tmp_path / "out.json").read_text())["results"]["host_time"]
    assert host["steps"] >= 5 and host["wait_ms"] == 0  # CPU: nothing runs asynchronously
    assert host["host_ms"] == pytest.approx(host["step_ms"]) and host["host_share"] == pytest.approx(1.0)
    assert sum(host["phases_ms"].values()) == pytest.approx(host["step_ms"])
    assert host["phases_ms"]["prepare"] > 0 and host["phases_ms"]["stops"] > 0
    assert "host time per step" in capsys.readouterr().out
    # Without the flag: no timing, no field.
    args.report_host_time = False
    assert throughput.run(args) == 0
    assert json.loads((tmp_path / "out.json").read_text())["results"]["host_time"] is None

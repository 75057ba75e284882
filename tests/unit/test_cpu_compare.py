"""``mixtral bench throughput --compare`` on the tiny checkpoint: one run, the same weights through our engine (bf16,
and int8 / int4 on the Q8_0 / Q4_0 GGUF files it wrote), transformers and (marked ``peers``) llama.cpp; the table,
the JSON and the ratios. Bounded: 4-token prompts, 6 output tokens, 3 prompts, one timed repeat."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mixtral.bench.cpu_compare import Measured, run_engine, table_rows
from mixtral.bench.cpu_peers import PeerRun, run_llama_cpp
from mixtral.checkpoint.gguf_writer import convert_to_gguf
from mixtral.checkpoint.loader import load_model
from mixtral.cli.main import main
from mixtral.engine.llm_engine import LLMEngine

pytestmark = pytest.mark.timeout(600)

FLAGS = ["--input-len", "4", "--output-len", "6", "--compare-batch", "3", "--compare-repeats", "1", "--threads", "1"]


def _compare(model: Path, runs: str, tmp_path: Path) -> dict:
    out = tmp_path / "compare.json"
    rc = main(["bench", "throughput", "--compare", "--model", str(model), "--compare-runs", runs, "--json", str(out),
               "--gguf-dir", str(tmp_path / "gguf"), *FLAGS])
    assert rc == 0
    return json.loads(out.read_text())


def test_compare_runs_ours_and_transformers_on_the_same_weights(tiny_hf_checkpoint: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    record = _compare(tiny_hf_checkpoint, "bf16,int8,int4,transformers", tmp_path)
    rows = {r["run"]: r for r in record["results"]}
    assert list(rows) == ["bf16", "int8", "int4", "transformers"]
    for r in rows.values():
        assert r["batch1_decode_tok_s"] > 0 and r["batched_output_tok_s"] > 0
        assert r["batch1_ratio"] is None  # no llama.cpp row to divide by
    assert rows["int8"]["weights"] == "Q8_0 file" and rows["int4"]["weights"] == "Q4_0 file"
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == ["model-q4_0.gguf", "model-q8_0.gguf"]
    assert record["environment"]["threads"] == 1 and record["config"]["compare_batch"] == 3
    table = capsys.readouterr().out
    assert "CPU comparison" in table and "transformers" in table and "Q4_0 file" in table


def test_engine_runner_gives_the_greedy_tokens_alone_and_batched(tiny_hf_checkpoint: Path) -> None:
    """Our row's runner: each prompt's greedy tokens equal our model's, batched or not, and the figures add up."""
    prompts = [[1, 22557, 1526], [1, 910, 460, 368, 28804], [1, 7]]
    model = load_model(tiny_hf_checkpoint, "cpu", torch.float32)
    want = []
    with torch.inference_mode():
        for p in prompts:
            ids = list(p)
            for _ in range(5):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            want.append(ids[len(p):])
    engine = LLMEngine.from_config(tiny_hf_checkpoint, device="cpu", dtype="fp32", enable_prefix_caching=False)
    for batch in (1, 3):
        run = run_engine(engine, prompts, 5, batch)
        assert run.tokens == want and run.batch == batch and run.prefill_s > 0 and run.decode_s > 0
    engine.shutdown()


def test_ratios_divide_by_the_llama_cpp_row_of_the_same_weights() -> None:
    def m(b1_decode_s: float, many_s: float, tokens: list[int]) -> Measured:
        return Measured(PeerRun("x", "1", 1, 0.1, b1_decode_s, [tokens]),
                        PeerRun("x", "1", 2, 0.0, many_s, [tokens, tokens]))

    results = {"int4": m(1.0, 1.0, [1, 2, 3, 4, 5]), "transformers": m(4.0, 2.0, [1, 2, 3, 4, 5]),
               "llama.cpp Q4_0": m(0.5, 0.5, [1, 2, 9, 4, 5]), "llama.cpp BF16": m(1.0, 1.0, [1, 2, 3, 4, 5])}
    rows = {r.run: r for r in table_rows(results, {}, "bfloat16")}
    assert rows["int4"].vs == "llama.cpp Q4_0" and rows["int4"].batch1_ratio == pytest.approx(0.5)
    assert rows["int4"].batched_ratio == pytest.approx(0.5) and rows["int4"].greedy_prefix == 2
    assert rows["transformers"].vs == "llama.cpp BF16" and rows["transformers"].batched_ratio == pytest.approx(0.5)
    assert rows["transformers"].greedy_prefix == 5 and rows["llama.cpp Q4_0"].vs is None


def test_bad_run_names_are_refused(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "throughput", "--compare", "--compare-runs", "bf16,int3"])
    assert "int3" in capsys.readouterr().err


@pytest.mark.peers  # needs the peers extra (llama-cpp-python): deselected by default, `pytest -m peers`
def test_compare_with_llama_cpp(tiny_hf_checkpoint: Path, tmp_path: Path) -> None:
    record = _compare(tiny_hf_checkpoint, "bf16,int4,llama.cpp", tmp_path)
    rows = {r["run"]: r for r in record["results"]}
    assert list(rows) == ["bf16", "int4", "llama.cpp BF16", "llama.cpp Q8_0", "llama.cpp Q4_0"]
    assert rows["int4"]["vs"] == "llama.cpp Q4_0" and rows["int4"]["batch1_ratio"] > 0
    assert rows["bf16"]["vs"] == "llama.cpp BF16" and rows["bf16"]["batched_ratio"] > 0


@pytest.mark.peers
def test_llama_cpp_runs_our_gguf_as_our_model(tiny_hf_checkpoint: Path, tmp_path: Path) -> None:
    """A float file from our writer is the same model to llama.cpp: its greedy tokens are ours."""
    prompts = [[1, 22557, 1526, 28725], [1, 910, 460, 368, 28804, 7]]
    path = convert_to_gguf(tiny_hf_checkpoint, tmp_path / "tiny.gguf", "f32")
    engine = LLMEngine.from_config(tiny_hf_checkpoint, device="cpu", dtype="fp32", enable_prefix_caching=False)
    want = run_engine(engine, prompts, 6, 2).tokens
    engine.shutdown()
    assert run_llama_cpp(path, prompts, 6, batch=2, threads=1).tokens == want


def test_interleaved_rounds_run_every_row_once_a_round_and_keep_the_median() -> None:
    from mixtral.bench.cpu_compare import measure_interleaved

    calls: list[tuple[str, int, int]] = []
    speed = {"a": iter([3.0, 1.0, 2.0]), "b": iter([5.0, 6.0, 4.0])}

    def runner(name: str):  # decode seconds per timed batch-1 run from ``speed``; batched runs take 1 s
        def run(prompts: list[list[int]], out: int, batch: int) -> PeerRun:
            calls.append((name, out, batch))
            secs = next(speed[name]) if (out, batch) == (6, 1) else 1.0
            return PeerRun(name, "v", batch, 0.0, secs, [[0] * out for _ in prompts])
        return run

    got = measure_interleaved({"a": runner("a"), "b": runner("b")}, [[1, 2]] * 3, 6, 3, rounds=3)
    timed = [c for c in calls if c[1] == 6]
    assert [c[0] for c in timed] == ["a", "b", "a", "b"] * 3  # per round: both batch 1, then both batched
    assert [c[2] for c in timed[:4]] == [1, 1, 3, 3]
    assert got["a"].batch1.decode_s == 2.0 and got["b"].batch1.decode_s == 5.0  # the medians
    assert len(calls) == 4 + len(timed)  # one warm-up of each shape per row


def test_compare_interleaved_end_to_end(tiny_hf_checkpoint: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "compare.json"
    flags = [f if f != "1" or i != FLAGS.index("--compare-repeats") + 1 else "2" for i, f in enumerate(FLAGS)]
    rc = main(["bench", "throughput", "--compare", "--compare-interleave", "--model", str(tiny_hf_checkpoint),
               "--compare-runs", "bf16,int4", "--json", str(out), *flags])
    assert rc == 0
    rows = {r["run"]: r for r in json.loads(out.read_text())["results"]}
    assert list(rows) == ["bf16", "int4"] and all(r["batch1_decode_tok_s"] > 0 for r in rows.values())
    assert "median of 2 interleaved rounds" in capsys.readouterr().out.replace("\n", " ")


def test_packed_rows_run_the_gguf_files_through_the_packed_kernel(tiny_hf_checkpoint: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """int4-packed: the Q4_0 file with cpu_int_kernel 'packed' whatever --cpu-int-kernel says; int4 takes the flag."""
    from mixtral.bench import cpu_compare

    seen: list[tuple[str, str]] = []
    real = cpu_compare._engine_runner

    def spy(model: str, args: argparse.Namespace, quantization: str | None, max_len: int,
            cpu_int_kernel: str | None = None) -> tuple[Any, Any]:
        engine, runner = real(model, args, quantization, max_len, cpu_int_kernel)
        seen.append((Path(model).name, engine.model_runner.model.kernels.config.cpu_int_kernel))
        return engine, runner

    monkeypatch.setattr(cpu_compare, "_engine_runner", spy)
    record = _compare(tiny_hf_checkpoint, "int4,int4-packed", tmp_path)
    assert seen == [("model-q4_0.gguf", "auto"), ("model-q4_0.gguf", "packed")]
    rows = {r["run"]: r for r in record["results"]}
    assert rows["int4-packed"]["weights"] == "Q4_0 file, packed kernel"

"""``mixtral bench gpu --quantization a,b,...``'s scheme loop on a CPU with the tiny preset: each scheme gets its
own engine, freed before the next is built; its figures are held to its own roofline (its weights' bytes as a
load allocates them); a scheme that cannot fit is reported with its bytes and the run goes on; a measurement
that fails keeps the figures before it; ratios to the unquantized scheme are added when it ran."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

from mixtral.bench import gpu, gpu_plan, gpu_runner, roofline
from mixtral.bench.gpu_plan import Machine
from mixtral.bench.gpu_runner import run_schemes
from mixtral.bench.gpu_table import build_table, notes
from mixtral.engine.memory import InsufficientMemoryError

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--model", "tiny", "--dtype", "fp32", "--batch-sizes", "1,3", "--context", "8", "--decode-steps", "2",
        "--prefill-len", "16", "--prefill-rest", "0", "--offline", "8:3", "--offline-requests", "5",
        "--max-num-seqs", "4"]


def _args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    gpu.add_arguments(parser)
    args = parser.parse_args([*FAST, *extra])
    assert gpu.arg_problem(args) is None
    return args


def _machine(capacity: int = 1 << 30) -> Machine:
    return Machine(torch.device("cpu"), "cpu", bandwidth=2e10, matmul=1e11, peaks={"bf16": 1e11, "fp8": 2e11},
                   capacity=capacity)


def _run(args: argparse.Namespace, machine: Machine) -> dict[str, Any]:
    results = gpu.run_header(args, gpu.model_name(args), machine)
    run_schemes(args, gpu.model_name(args), machine, Console(quiet=True),
                on_scheme=lambda s: gpu.finish(results, s, None))
    return results


def test_each_scheme_measured_against_its_own_bytes_one_engine_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[weakref.ref[Any]] = []
    alive_at_build: list[int] = []
    build = gpu_runner.build_engine

    def tracked(*a: Any, **k: Any) -> Any:
        import gc

        gc.collect()
        alive_at_build.append(sum(ref() is not None for ref in built))
        engine = build(*a, **k)
        built.append(weakref.ref(engine))
        return engine

    monkeypatch.setattr(gpu_runner, "build_engine", tracked)
    results = _run(_args("--quantization", "int8,none,fp8"), _machine())
    schemes = results["schemes"]
    assert list(schemes) == ["int8", "fp32", "fp8"] and results["baseline"] == "fp32"
    assert alive_at_build == [0, 0, 0]  # the previous engine was gone before the next one was built
    assert all(ref() is None for ref in built)

    for label, res in schemes.items():
        assert res["status"] == "ok", res
        plan = gpu_plan.plan_scheme("tiny", res["quantization"], "fp32")
        assert res["weight_bytes"] == plan.weight_bytes
        for row in res["decode"]:
            step = roofline.decode_step_bytes(plan_args(), row["batch"], 8, 4, plan.fmt, 4)
            assert row["roofline_tok_s"] == pytest.approx(row["batch"] * 2e10 / step.total)
            assert row["fraction"] == pytest.approx(row["tok_s"] / row["roofline_tok_s"])
            assert (row["over_baseline"] == 1.0) == (label == "fp32")
        peak = 2e11 if label == "fp8" else 1e11
        assert res["prefill"]["fraction_of_peak"] == pytest.approx(
            roofline.prefill_flops(plan_args(), 16) / res["prefill"]["seconds"] / peak)
        offline = res["offline"][0]
        assert offline["requests"] == 5 and offline["max_running"] == 4 and offline["preemptions"] == 0
        host = offline["host"]
        assert host["steps"] >= 3 and 0 <= host["host_share"] < 1
        assert host["wall_ms_per_step"] == pytest.approx(host["device_ms_per_step"] + host["host_ms_per_step"])
    # The quantized schemes read fewer bytes per step than fp32, so their rooflines are higher.
    roofs = {label: res["decode"][0]["roofline_tok_s"] for label, res in schemes.items()}
    assert roofs["fp32"] < roofs["int8"] and roofs["fp32"] < roofs["fp8"]


def plan_args() -> Any:
    from mixtral.model.presets import preset

    return preset("tiny")


def test_a_scheme_that_does_not_fit_is_reported_with_its_bytes() -> None:
    fp32 = gpu_plan.plan_scheme("tiny", None, "fp32").weight_bytes["total"]
    int8 = gpu_plan.plan_scheme("tiny", "int8", "fp32").weight_bytes["total"]
    assert int8 < fp32
    results = _run(_args("--quantization", "none,int8"), _machine(capacity=(fp32 + int8) // 2))
    none, q = results["schemes"]["fp32"], results["schemes"]["int8"]
    assert none["status"] == "does not fit" and "decode" not in none
    assert "weights take" in none["error"] and "GiB" in none["error"]
    assert q["status"] == "ok" and "over_baseline" not in q["decode"][0]  # no baseline figures to divide by
    header, rows = build_table(results)
    assert rows[0][header.index("fp32 of bound")] == "does not fit"
    assert rows[1][header.index("fp32")] == "-" and rows[1][header.index("int8")] != "-"


def test_the_engines_memory_error_is_a_scheme_that_does_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a: Any, **k: Any) -> Any:
        raise InsufficientMemoryError("'tiny' does not fit: it needs 9.9 GiB")

    monkeypatch.setattr(gpu_runner, "build_engine", refuse)
    res = _run(_args("--quantization", "fp8"), _machine())["schemes"]["fp8"]
    assert res["status"] == "does not fit" and "needs 9.9 GiB" in res["error"]


def test_a_failed_measurement_keeps_the_figures_before_it_and_the_next_scheme_runs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def flaky(*a: Any, **k: Any) -> float:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("prefill broke\nsecond line")
        return real(*a, **k)

    real = gpu_runner.bench_prefill
    monkeypatch.setattr(gpu_runner, "bench_prefill", flaky)
    results = _run(_args("--quantization", "none,int8", "--offline", ""), _machine())
    first, second = results["schemes"]["fp32"], results["schemes"]["int8"]
    assert first["status"] == "failed" and first["error"] == "RuntimeError: prefill broke"
    assert [r["batch"] for r in first["decode"]] == [1, 3] and "prefill" not in first
    assert second["status"] == "ok" and "prefill" in second and second["offline"] == []
    assert "fp32: failed: RuntimeError: prefill broke" in notes(results)


def test_json_is_rewritten_after_each_figure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "bench.json"
    seen: list[dict[str, tuple[str, int]]] = []
    write = gpu.finish

    def spy(results: dict[str, Any], schemes: dict[str, Any], path: Path | None) -> None:
        write(results, schemes, path)
        data = json.loads(path.read_text()) if path else {}
        seen.append({k: (v["status"], len(v.get("decode", []))) for k, v in data["schemes"].items()})

    monkeypatch.setattr(gpu, "finish", spy)
    args = _args("--quantization", "none,int8", "--offline", "", "--json", str(out))
    results = gpu.run_header(args, "tiny", _machine())
    run_schemes(args, "tiny", _machine(), Console(quiet=True), on_scheme=lambda s: gpu.finish(results, s, args.json))
    assert seen[0] == {"fp32": ("running", 0)} and {"fp32": ("running", 1)} in seen  # after the first figure
    assert {"fp32": ("ok", 2), "int8": ("running", 1)} in seen and seen[-1] == {"fp32": ("ok", 2), "int8": ("ok", 2)}
    data = json.loads(out.read_text())
    assert data["baseline"] == "fp32" and data["table_markdown"].startswith("| figure | fp32 |")
    assert data["schemes"]["int8"]["prefill"]["over_baseline"] > 0


def test_the_command_prints_the_table_and_keeps_the_figures_when_interrupted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``mixtral bench gpu`` end to end with the CPU standing in for the GPU: a SIGINT (a time limit) during the
    second scheme's offline run ends it with status 130, the first scheme's figures and the second's decode and
    prefill in the JSON, the table printed and the plot drawn."""
    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_plan.Machine, "measure", classmethod(lambda cls, device, util: _machine()))
    real = gpu_runner.bench_offline
    calls: list[int] = []

    def offline(*a: Any, **k: Any) -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(gpu_runner, "bench_offline", offline)
    parser = argparse.ArgumentParser()
    gpu.add_arguments(parser)
    args = parser.parse_args([*FAST, "-q", "none,int8", "--json", str(tmp_path / "b.json"), "--plot",
                              str(tmp_path / "b.png")])
    assert gpu.run(args) == 130
    data = json.loads((tmp_path / "b.json").read_text())
    fp32, int8 = data["schemes"]["fp32"], data["schemes"]["int8"]
    assert fp32["status"] == "ok" and len(fp32["offline"]) == 1
    assert int8["status"] == "interrupted" and len(int8["decode"]) == 2 and "prefill" in int8
    out = capsys.readouterr().out
    assert "mixtral bench gpu: tiny (fp32, KV cache auto) on cpu" in out and "int8: interrupted" in out
    assert (tmp_path / "b.png").stat().st_size > 0


def test_tensor_parallel_schemes_report_per_gpu_figures_and_skip_peers() -> None:
    """TP 2 over gloo on CPU (a driver process: the group lives and dies with it): rooflines are the busiest
    rank's, the all-reduce time per step is reported, and the peers (unquantized one-GPU only) are skipped."""
    code = f"""
import json, torch, argparse
from rich.console import Console
from mixtral.bench import gpu
from mixtral.bench.gpu_plan import Machine
from mixtral.bench.gpu_runner import run_schemes
p = argparse.ArgumentParser(); gpu.add_arguments(p)
args = p.parse_args({[*FAST, "-tp", "2", "--quantization", "none,int8", "--offline", "", "--peer", "compiled"]!r})
m = Machine(torch.device("cpu"), "cpu", 2e10, 1e11, {{"bf16": 1e11, "fp8": 2e11}}, 1 << 30)
res = gpu.run_header(args, "tiny", m)
run_schemes(args, "tiny", m, Console(quiet=True), on_scheme=lambda s: gpu.finish(res, s, None))
print("RESULT" + json.dumps(res))
"""
    path = os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.split("RESULT", 1)[1])
    from mixtral.bench.parallel import rank_decode_bytes
    from mixtral.distributed.config import ParallelConfig

    assert results["parallel_layout"] == "TP 2" and results["ranks"] == 2
    for label, res in results["schemes"].items():
        assert res["status"] == "ok", res
        assert res["peers_skipped"] and "peer_compiled" not in res
        fmt = roofline.WeightFormat(**res["bytes_per_param"])
        for row, par in zip(res["decode"], res["parallel"]["decode"], strict=True):
            step = rank_decode_bytes(plan_args(), ParallelConfig(2), row["batch"], 8, 4, fmt, 4)
            assert row["roofline_tok_s"] == pytest.approx(row["batch"] * 2e10 / step.total), label
            assert par["roofline_per_gpu_tok_s"] == pytest.approx(row["roofline_tok_s"])
            assert par["all_reduce_ms_per_step"] > 0
        assert res["prefill"]["TFLOPs"] * res["prefill"]["seconds"] * 1e12 == pytest.approx(
            roofline.prefill_flops(plan_args(), 16) / 2)
    _, rows = build_table(results)
    assert rows[0][0] == "weights per GPU" and any(r[0].startswith("all-reduce ms per decode step") for r in rows)

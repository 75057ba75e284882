"""``mixtral bench gpu``'s flags for schemes, sequences and parallelism, and its table: a column group per
scheme, built from the results alone (no GPU), with the ratio to the unquantized scheme only where it ran."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from mixtral.bench import gpu
from mixtral.bench.gpu_table import build_table, notes, plot_decode, to_markdown
from mixtral.cli.main import build_parser


@pytest.mark.parametrize("value", ["fp4", "fp8,fp8", ",", "none,bf16"])
def test_bad_scheme_lists_are_argparse_errors(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser("bench").parse_args(["bench", "gpu", f"--quantization={value}"])
    err = capsys.readouterr().err
    assert "argument --quantization/-q: must be comma-separated schemes from none, fp8" in err and repr(value) in err


def test_flags_parse_to_what_the_runner_uses() -> None:
    args = build_parser("bench").parse_args(
        ["bench", "gpu", "-q", "none,fp8", "--max-num-seqs", "512", "--offline-requests", "2048", "-tp", "2",
         "--enable-expert-parallel"])
    assert (args.quantization, args.max_num_seqs, args.offline_requests) == ("none,fp8", 512, 2048)
    assert (args.tensor_parallel_size, args.enable_expert_parallel) == (2, True)
    from mixtral.bench.gpu_plan import parse_schemes

    assert parse_schemes(args.quantization) == [None, "fp8"]
    defaults = build_parser("bench").parse_args(["bench", "gpu"])
    assert (defaults.quantization, defaults.max_num_seqs, defaults.tensor_parallel_size) == ("none", None, 1)


@pytest.mark.parametrize(("flags", "says"), [
    (["--batch-sizes", "1,64", "--max-num-seqs", "32"], "--max-num-seqs 32 is below the largest of --batch-sizes (64)"),
    (["-tp", "4", "--expert-parallel-size", "3"], "expert_parallel_size 3 must divide tensor_parallel_size 4"),
])
def test_flag_combinations_refused_before_anything_loads(flags: list[str], says: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    gpu.add_arguments(parser)
    assert gpu.run(parser.parse_args(flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixtral bench gpu: ") and says in err, err


def _scheme(label: str, quantized: bool, scale: float, status: str = "ok", **extra: Any) -> dict[str, Any]:
    res: dict[str, Any] = {"scheme": label, "quantized": quantized, "status": status, "kv_cache_dtype": "auto",
                           "weight_bytes": {"total": int(44 * 2**30 / scale)}}
    if status == "ok":
        res["decode"] = [{"batch": b, "tok_s": 100.0 * b * scale, "roofline_tok_s": 120.0 * b * scale,
                          "fraction": 100 / 120} for b in (1, 64)]
        res["prefill"] = {"tokens": 2048, "tok_s": 40000.0 * scale, "TFLOPs": 500.0, "peak_TFLOPs": 989.0,
                          "fraction_of_peak": 500 / 989}
        res["offline"] = [{"requests": 2048, "input_len": 128, "output_len": 128, "output_tok_s": 9000.0 * scale,
                           "max_running": 512, "host": {"host_ms_per_step": 1.5, "wall_ms_per_step": 30.0,
                                                        "host_share": 0.05}}]
    res.update(extra)
    return res


def _results(**schemes: dict[str, Any]) -> dict[str, Any]:
    return {"model": "mixtral-8x7b", "dtype": "bf16", "device": "NVIDIA H100 80GB HBM3", "commit": "abc1234",
            "engine_memory_bytes": int(72.9 * 2**30), "schemes": schemes,
            "baseline": next((k for k, v in schemes.items() if not v["quantized"]), None)}


def test_table_has_a_column_group_per_scheme_and_ratios_to_the_baseline() -> None:
    from mixtral.bench.gpu_runner import compare_to_baseline

    schemes = {"bf16": _scheme("bf16", False, 1.0), "fp8": _scheme("fp8", True, 1.8)}
    compare_to_baseline(schemes, "bf16")
    header, rows = build_table(_results(**schemes))
    assert header == ["figure", "bf16", "bf16 bound", "bf16 of bound", "fp8", "fp8 bound", "fp8 of bound",
                      "fp8 / bf16"]
    by_name = {r[0]: r for r in rows}
    assert by_name["weights"][1:4] == ["44.0 GiB", "of 72.9 GiB", "60%"]
    assert by_name["decode batch 64 (tok/s)"][4:] == ["11,520.0", "13,824.0", "83%", "1.80x"]
    assert by_name["prefill 2048, back to back (tok/s)"][1:4] == ["40,000", "500 of 989 TFLOP/s", "50.6%"]
    assert by_name["prefill 2048, back to back (tok/s)"][-1] == "1.80x"
    assert by_name["offline 2048 x 128/128 (output tok/s)"][4:6] == ["16,200", "512 running"]
    assert by_name["offline 2048 x 128/128: host ms of ms/step"][1:4] == ["1.50", "30.00", "5%"]
    md = to_markdown(header, rows)
    assert md.splitlines()[1] == "|---|" + "---:|" * 7 and "| decode batch 1 (tok/s) | 100.0 |" in md


def test_a_scheme_that_does_not_fit_shows_dashes_and_no_ratio_column_without_a_baseline() -> None:
    results = _results(bf16=_scheme("bf16", False, 1.0, status="does not fit",
                                    error="bf16 weights take 87.0 GiB; the engine may use 72.9 GiB"),
                       fp8=_scheme("fp8", True, 2.0))
    results["baseline"] = None  # it did not run: nothing to divide by
    header, rows = build_table(results)
    assert "fp8 / bf16" not in header
    assert rows[0][1:4] == ["44.0 GiB", "of 72.9 GiB", "does not fit"]
    assert all(r[1] == "-" for r in rows[1:])
    assert notes(results) == ["bf16: does not fit: bf16 weights take 87.0 GiB; the engine may use 72.9 GiB"]


def test_plot_draws_a_line_per_scheme(tmp_path: Path) -> None:
    out = tmp_path / "bench.png"
    lines = plot_decode(_results(bf16=_scheme("bf16", False, 1.0), int4=_scheme("int4", True, 3.0),
                                 fp16=_scheme("fp16", False, 1.0, status="does not fit")), out)
    assert lines == ["bf16 roofline", "mixtral bf16", "int4 roofline", "mixtral int4"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

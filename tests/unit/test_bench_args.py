"""``mixtral bench`` refuses nonsensical numbers as argparse errors naming the flag and the value, before any
model loads (a 0-token prompt used to end in an engine traceback); good values still parse to what the
benchmarks use."""

from __future__ import annotations

import argparse

import pytest

from mixtral.bench import gpu
from mixtral.cli.main import build_parser

BAD = [
    ("throughput", "--input-len", "0"),
    ("throughput", "--input-len", "-5"),
    ("throughput", "--output-len", "0"),
    ("throughput", "--num-prompts", "0"),
    ("throughput", "--max-num-seqs", "-1"),
    ("throughput", "--max-num-batched-tokens", "0"),
    ("throughput", "--max-model-len", "0"),
    ("throughput", "--block-size", "0"),
    ("throughput", "--kv-cache-bytes", "-1"),
    ("throughput", "--threads", "0"),
    ("throughput", "--temperature", "-0.5"),
    ("throughput", "--temperature", "nan"),
    ("throughput", "--gpu-memory-utilization", "1.5"),
    ("throughput", "--gpu-memory-utilization", "0"),
    ("throughput", "--input-len", "ten"),
    ("serve", "--num-requests", "0"),
    ("serve", "--input-len", "-1"),
    ("serve", "--output-len", "0"),
    ("serve", "--concurrency", "0"),
    ("serve", "--request-rate", "0"),
    ("serve", "--request-rate", "inf"),
    ("serve", "--max-num-seqs", "0"),
    ("gpu", "--layers", "0"),
    ("gpu", "--batch-sizes", "1,0,8"),
    ("gpu", "--batch-sizes", ","),
    ("gpu", "--batch-sizes", "1,x"),
    ("gpu", "--context", "0"),
    ("gpu", "--decode-steps", "-2"),
    ("gpu", "--prefill-len", "0"),
    ("gpu", "--prefill-rest", "-1"),
    ("gpu", "--prefill-rest", "nan"),
    ("gpu", "--offline", "128:0"),
    ("gpu", "--offline", "128"),
    ("gpu", "--offline", "1:2:3"),
    ("gpu", "--offline-requests", "0"),
    ("gpu", "--gpu-memory-utilization", "2"),
    ("gpu", "--peer", "vllm"),
    ("gpu", "--peer", "hf,none"),
    ("gpu", "--peer", ","),
    ("gpu", "--peer-batch-sizes", "0"),
]


@pytest.mark.parametrize(("bench", "flag", "value"), BAD)
def test_nonsense_is_an_argparse_error_naming_flag_and_value(bench: str, flag: str, value: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser("bench").parse_args(["bench", bench, f"{flag}={value}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"mixtral bench {bench}: error: argument {flag}: " in err and repr(value) in err, err


def test_good_values_parse_to_what_the_benchmarks_use() -> None:
    parser = build_parser("bench")
    args = parser.parse_args(["bench", "throughput", "--input-len", "1", "--temperature", "0",
                              "--gpu-memory-utilization", "1"])
    assert (args.input_len, args.temperature, args.gpu_memory_utilization) == (1, 0.0, 1.0)
    args = parser.parse_args(["bench", "serve", "--request-rate", "0.5", "--output-len", "3"])
    assert (args.request_rate, args.output_len) == (0.5, 3)
    args = parser.parse_args(["bench", "gpu", "--batch-sizes", "1,16", "--offline", "", "--layers", "2"])
    assert (args.batch_sizes, args.offline, args.layers) == ("1,16", "", 2)
    defaults = parser.parse_args(["bench", "gpu"])  # argparse runs string defaults through the types too
    assert (defaults.batch_sizes, defaults.offline, defaults.peer) == ("1,8,32,64,128", "128:128,1000:1000", "none")
    args = parser.parse_args(["bench", "gpu", "--peer", "hf,compiled", "--peer-batch-sizes", "1,8"])
    assert (args.peer, args.peer_batch_sizes) == ("hf,compiled", "1,8")


@pytest.mark.parametrize(("flags", "says"), [
    (["--model", "/some/folder", "--layers", "2"], "--layers needs a preset --model"),
    (["--model", "tiny", "--layers", "99"], "--layers 99: tiny has only"),
    (["--peer", "compiled", "--batch-sizes", "1,8", "--peer-batch-sizes", "1,4"],
     "--peer-batch-sizes [4] are not among --batch-sizes [1, 8]"),
])
def test_gpu_layers_needs_a_preset_that_has_them(flags: list[str], says: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # Checked before the CUDA check, so this runs on CPU; --layers on a folder used to be a KeyError.
    parser = argparse.ArgumentParser()
    gpu.add_arguments(parser)
    assert gpu.run(parser.parse_args(flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mixtral bench gpu: {says}"), err

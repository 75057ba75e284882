"""``mixtral bench throughput`` end to end on the tiny preset: synthetic and dataset modes, JSON output."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from mixtral.bench import throughput


def _args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    throughput.add_arguments(parser)
    return parser.parse_args(["--num-prompts", "6", "--input-len", "12", "--output-len", "5", "--max-model-len", "128",
                              "--kv-cache-bytes", str(1 << 22), "--json", str(tmp_path / "out.json"), *extra])


def test_synthetic_run_reports_consistent_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert throughput.run(_args(tmp_path, "--max-num-batched-tokens", "32")) == 0
    record = json.loads((tmp_path / "out.json").read_text())
    r = record["results"]
    assert r["num_requests"] == 6 and r["prompt_tokens"] == 6 * 12 and r["output_tokens"] == 6 * 5
    assert r["output_tokens_per_s"] == pytest.approx(r["output_tokens"] / r["elapsed_s"])
    assert r["total_tokens_per_s"] == pytest.approx((r["prompt_tokens"] + r["output_tokens"]) / r["elapsed_s"])
    assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] and 0 < r["itl_p50_ms"] <= r["itl_p99_ms"]
    assert record["environment"]["device"].startswith("cpu") and record["config"]["num_prompts"] == 6
    shown = capsys.readouterr().out
    assert "output tokens/s" in shown and "ITL p50 / p99" in shown


def test_dataset_mode_reads_text_and_token_prompts(tmp_path: Path) -> None:
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "Hello there", "output_len": 3}\n\n{"prompt_token_ids": [1, 500, 600]}\n')
    assert throughput.run(_args(tmp_path, "--dataset", str(data))) == 0
    r = json.loads((tmp_path / "out.json").read_text())["results"]
    assert r["num_requests"] == 2 and r["output_tokens"] == 3 + 5


@pytest.mark.parametrize(("line", "says"), [
    ('{"text": "no prompt"}', "bad.jsonl:2 needs a 'prompt'"),
    ('{"prompt_token_ids": []}', "bad.jsonl:2: the prompt is empty"),
    ('{"prompt_token_ids": [5, 99999]}', "bad.jsonl:2: token ids [99999] are outside the vocabulary (size 32768)"),
    ('{"prompt": "Hi", "output_len": 0}', "bad.jsonl:2: 'output_len' must be a whole number >= 1, got 0"),
    ('[1, 2]', "bad.jsonl:2 must be a JSON object, got list"),
])
def test_bad_dataset_line_is_one_line_naming_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           line: str, says: str) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n' + line + "\n")
    assert throughput.run(_args(tmp_path, "--dataset", str(bad))) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixtral bench throughput: --dataset: ") and says in err, err
    assert not (tmp_path / "out.json").exists()


def test_missing_dataset_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert throughput.run(_args(tmp_path, "--dataset", str(tmp_path / "nope.jsonl"))) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixtral bench throughput: --dataset: ") and "nope.jsonl" in err, err


def test_prompt_longer_than_max_model_len_names_the_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    assert throughput.run(_args(tmp_path, "--input-len", "200")) == 2  # _args sets --max-model-len 128
    err = capsys.readouterr().err
    assert err.startswith("mixtral bench throughput: --input-len 200 cannot be served:"), err
    assert "max_model_len is 128" in err and "--max-model-len" in err


def test_unloadable_model_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert throughput.run(_args(tmp_path, "--model", str(tmp_path / "no-such-model"))) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixtral bench throughput: cannot load ") and "no-such-model" in err, err


def test_percentile_interpolates() -> None:
    assert throughput.percentile([], 50) == 0.0
    assert throughput.percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert throughput.percentile([5.0, 1.0], 100) == 5.0


def test_prefix_cache_hit_rate_counts_only_the_measured_requests(tmp_path: Path) -> None:
    # Two equal 48-token prompts, one at a time: the second finds 2 of its blocks (32 tokens) cached, so the
    # rate is 32 / 96. The warm-up's 16-token lookup used to be counted too (32 / 112).
    data = tmp_path / "same.jsonl"
    line = json.dumps({"prompt_token_ids": list(range(1000, 1048)), "output_len": 2})
    data.write_text(f"{line}\n{line}\n")
    assert throughput.run(_args(tmp_path, "--dataset", str(data), "--max-num-seqs", "1")) == 0
    r = json.loads((tmp_path / "out.json").read_text())["results"]
    assert r["prefix_cache_hit_rate"] == pytest.approx(32 / 96)

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
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1 needs a 'prompt'"):
        throughput.run(_args(tmp_path, "--dataset", str(bad)))


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

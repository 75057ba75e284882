"""``python -m mixtral.bench.kv_quality`` (the FP8 KV-cache quality figures of docs/QUANTIZATION.md): a short run
end to end on the demo model, and the two measures it is built from."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mixtral.bench import kv_quality


def test_short_run_writes_sane_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kv.json"
    assert kv_quality.main(["--dtype", "fp32", "--chats", "3", "--max-tokens", "4", "--no-shapes",
                            "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["prompts"] == 3 + 16  # 3 chats (fewer than 48), then 16 prose openings
    for name in ("auto", "fp8", "fp8_amax"):
        assert all(math.isfinite(p) and p > 1 for p in report[name]["perplexity"].values())
    for name in ("fp8", "fp8_amax"):
        assert 0 <= report[name]["identical"] <= 1 and 0 <= report[name]["shared_prefix"] <= 1
        assert abs(report[name]["perplexity_change"]["chats"]) < 0.05
    assert len(report["kv"]) == 4 and len(report["amax_scales"]) == 4  # the demo's 4 layers
    for layer in report["kv"]:
        for name in ("k", "v"):
            assert layer[name]["above_448"] == 0 and 0.01 < layer[name]["rel_err_scale1"] < 0.04
    assert "greedy identical" in capsys.readouterr().out


def test_agreement_counts_where_outputs_part() -> None:
    ref = {"kinds": ["chats", "chats", "prose"], "greedy": [[1, 2, 3, 4], [5, 6, 7, 8], [1, 2]],
           "top2": [[[-0.1, -3.0]] * 4, [[-0.5, -0.7]] * 4, [[-1.0, -2.5]] * 2]}
    got = {"greedy": [[1, 2, 3, 4], [5, 6, 9, 9], [3, 3]]}
    chats = kv_quality.agreement(ref, got, "chats")
    assert chats["identical"] == 0.5 and chats["shared_prefix"] == (1 + 0.5) / 2
    assert chats["parted"] == 1 and chats["median_lead_where_parted"] == pytest.approx(0.2)
    assert chats["parted_below_0.5_nats"] == 1.0
    both = kv_quality.agreement(ref, got)
    assert both["identical"] == pytest.approx(1 / 3) and both["parted"] == 2
    assert both["parted_below_0.5_nats"] == 0.5
    # An output that stopped early (EOS) against one that went on is not identical.
    assert kv_quality.agreement({**ref, "greedy": [[1, 2], [5], [1]]}, {"greedy": [[1, 2, 3], [5], [1]]})[
        "identical"] == pytest.approx(2 / 3)


def test_real_shaped_sweep_shows_where_scale_one_loses() -> None:
    rows = {r["multiplier"]: r for r in kv_quality.shape_sweep("mixtral-8x7b", tokens=64)}
    mid = rows[1.0]
    assert mid["bf16"] < 0.01 and 0.02 < mid["fp8_scale1"] < 0.08
    assert mid["fp8_scale1"] == pytest.approx(mid["fp8_amax"], rel=0.2)  # inside e4m3's normal range: no loss
    for m in (1 / 256, 256.0):  # subnormal codes, or saturation at 448: scale 1.0 loses, the amax scale does not
        assert rows[m]["fp8_scale1"] > 2.5 * rows[m]["fp8_amax"]
        assert rows[m]["fp8_amax"] == pytest.approx(mid["fp8_amax"], rel=0.2)

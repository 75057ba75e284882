"""``mixtral bench quality`` (bench/quant_quality.py) on a reduced setting: it runs end to end through the real
quantized models and the engine, and what it measures stays within bounds (the full figures are in
docs/QUANTIZATION.md, made by the same tool at full size)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mixtral.bench.quant_quality import add_arguments, report, run


def test_reduced_quality_run_is_bounded(tmp_path: Path, capsys) -> None:
    p = argparse.ArgumentParser()
    add_arguments(p)
    out = tmp_path / "q.json"
    args = p.parse_args(["--chats", "4", "--prompts", "3", "--max-tokens", "4", "--layer-scale", "32",
                         "--layer-tokens", "8", "--json", str(out)])
    assert run(args) == 0
    res = json.loads(out.read_text())
    change = {s: res["schemes"][s]["perplexity_change"]["synthetic_chats"] for s in ("fp8", "int8", "int4")}
    assert abs(change["fp8"]) < 0.02 and abs(change["int8"]) < 0.02 and abs(change["int4"]) < 0.10, change
    for s in ("fp8", "int8"):
        assert res["schemes"][s]["greedy"]["tokens_before_first_difference"] >= 0.5
    layers = res["layers"]
    for name, row in layers.items():  # rounding error grows as bits shrink, each within its scheme's scale
        assert row["bf16"] < 0.005 and row["int8"] < 0.015 and row["fp8"] < 0.06 and row["int4"] < 0.16, (name, row)
        assert row["bf16"] < row["int8"] < row["fp8"] < row["int4"], (name, row)
    assert "| int4 |" in report(res)

"""The rule by which an in-engine prefill tile comparison changes a sorted-MoE table (bench/tile_adoption.py)."""

from __future__ import annotations

import json
from pathlib import Path

from mixtral.bench.tile_adoption import adopt, adoption
from mixtral.kernels.triton.moe_configs import GemmConfig, MoEConfig, load_configs

BASE = [100.0, 101.0, 99.0, 100.5, 100.0, 99.5, 100.0, 101.0, 100.0, 99.0]


def test_clear_win_with_equal_outputs_is_adopted() -> None:
    fast = [t * 0.98 for t in BASE]
    fast[3] = BASE[3] + 1  # lost one round: 9 of 10 still clears the 70% bar
    best, lines = adoption({"tuned": BASE, "fast": fast}, {"tuned": 0.0, "fast": 0.0})
    assert best == "fast"
    assert "90%" in lines[0] and "eligible" in lines[0]


def test_mean_win_from_few_rounds_is_refused() -> None:
    # Mean 2.4% shorter, but faster in only 5 of 10 rounds: one burst, not a repeatable win.
    lucky = BASE[:5] + [t * 0.952 for t in BASE[5:]]
    lucky = [t + 0.01 for t in lucky[:5]] + lucky[5:]
    best, _ = adoption({"tuned": BASE, "lucky": lucky}, {"lucky": 0.0})
    assert best is None


def test_small_gain_is_refused() -> None:
    best, _ = adoption({"tuned": BASE, "same": [t * 0.998 for t in BASE]}, {"same": 0.0})
    assert best is None


def test_different_or_unchecked_outputs_are_refused() -> None:
    fast = [t * 0.9 for t in BASE]
    assert adoption({"tuned": BASE, "fast": fast}, {"fast": 0.2})[0] is None
    assert adoption({"tuned": BASE, "fast": fast}, {"fast": float("nan")})[0] is None
    assert adoption({"tuned": BASE, "fast": fast}, {})[0] is None


def test_the_largest_eligible_gain_wins() -> None:
    runs = {"tuned": BASE, "a": [t * 0.98 for t in BASE], "b": [t * 0.97 for t in BASE],
            "c": [t * 0.90 for t in BASE]}
    best, lines = adoption(runs, {"a": 0.0, "b": 0.0, "c": 0.5})  # c is fastest but wrong
    assert best == "b"
    assert len(lines) == 3


def test_adopt_writes_one_entry_and_a_note(tmp_path: Path) -> None:
    keep = MoEConfig(64, GemmConfig(128, 64, 8, 3), GemmConfig(256, 64, 8, 4), 0)
    old = MoEConfig(128, GemmConfig(128, 64, 8, 4), GemmConfig(256, 64, 8, 4), 64)
    table = tmp_path / "sorted_E8_F14336_D4096_X.json"
    table.write_text(json.dumps({"device": "X", "configs": {"1024": keep.to_dict(), "2048": old.to_dict()},
                                 "pair_note": "kept"}))
    new = MoEConfig(128, GemmConfig(128, 64, 8, 4, warp_specialize=True, joint=True),
                    GemmConfig(256, 64, 8, 4), 64)
    adopt(table, 2048, "joint", new, ["joint: mean -1.8%"], "NVIDIA X", 32)
    configs = load_configs(table)
    assert configs is not None
    assert configs[2048] == new and configs[1024] == keep
    data = json.loads(table.read_text())
    assert data["pair_note"] == "kept"
    assert "joint" in data["adoption_notes"]["2048"] and "32-layer" in data["adoption_notes"]["2048"]

"""bench/parallel.py: the per-GPU roofline arithmetic, the all-reduce timing on a live group, and the
collective / control-channel comparison run as `python -m mixtral.bench.parallel`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_faults import ENV

from mixtral.bench.parallel import busiest_rank_experts, decode_roofline_tok_s, gpu_report, rank_decode_bytes
from mixtral.bench.roofline import decode_step_bytes, expected_experts_hit
from mixtral.distributed.config import ParallelConfig
from mixtral.distributed.engine import engine_over
from mixtral.distributed.executor import DistributedExecutor
from mixtral.engine.llm_engine import LLMEngine
from mixtral.model.presets import PRESETS


def test_busiest_expert_group() -> None:
    assert busiest_rank_experts(8, 8, 2, 1) == expected_experts_hit(8, 8, 2)
    # batch 1, top-2 of 8 over 2 groups: both in one group 3 times in 7 -> E[max] = 10/7
    assert busiest_rank_experts(1, 8, 2, 2) == pytest.approx(10 / 7, abs=0.03)
    assert busiest_rank_experts(1, 8, 2, 8) == 1.0  # 8 groups of one expert: never more than one
    assert busiest_rank_experts(256, 8, 2, 4) == pytest.approx(2.0)  # every expert of every group is hit


def test_rank_bytes_halve_under_tp2_and_ep_pays_at_batch_1() -> None:
    args = PRESETS["mixtral-8x7b"]
    one = decode_step_bytes(args, 1, 512).total
    tp2 = rank_decode_bytes(args, ParallelConfig(2), 1, 512).total
    ep2 = rank_decode_bytes(args, ParallelConfig(2, True), 1, 512).total
    assert 0.49 < tp2 / one < 0.52  # half, plus the replicated embeddings and lm_head
    assert ep2 > 1.3 * tp2  # whole experts: the busier rank often holds both chosen ones
    big = [rank_decode_bytes(args, c, 256, 512).total for c in (ParallelConfig(2), ParallelConfig(2, True))]
    assert big[0] == pytest.approx(big[1], rel=1e-3)  # every expert is read either way
    assert decode_roofline_tok_s(args, ParallelConfig(2), 1, 512, 3.35e12) == pytest.approx(3.35e12 / tp2)


def test_gpu_report_on_a_live_group(executor: DistributedExecutor) -> None:
    engine = engine_over(executor, LLMEngine, max_model_len=128, num_kv_blocks=32)
    report = gpu_report(engine, [1, 4], context=64, prefill_len=256, bandwidth=1e11, decode_tok_s={1: 100.0},
                        iters=3)
    assert report["layout"] == executor.parallel.describe()
    rows = {r["batch"]: r for r in report["decode"]}
    assert rows[1]["all_reduce_ms_per_step"] > 0 and rows[1]["all_reduce_share"] > 0
    assert rows[4]["fraction"] is None  # no decode figure given for batch 4
    assert report["prefill_all_reduce_ms"] > 0 and set(report["all_reduce_us"]) == {1, 4, 256}


def test_collective_comparison_runs(tmp_path: Path) -> None:
    out = tmp_path / "par.json"
    proc = subprocess.run([sys.executable, "-m", "mixtral.bench.parallel", "--nproc", "2", "--model", "tiny",
                           "--sizes", "2,16", "--iters", "3", "--json", str(out)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [r["tokens"] for r in data["collectives"]] == [2, 16]
    assert all(r["all_reduce_us"] > 0 and r["dispatch_us"] > 0 for r in data["collectives"])
    assert all(r["one_broadcast_us"] > 0 and r["two_broadcasts_us"] > 0 for r in data["control"])
    assert "1 broadcast us" in proc.stdout

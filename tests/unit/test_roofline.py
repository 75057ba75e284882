"""Roofline arithmetic: the figures the GPU benchmark divides by."""

from __future__ import annotations

import pytest

from mixtral.bench import roofline
from mixtral.model.presets import preset


def test_expected_experts_hit_limits() -> None:
    assert roofline.expected_experts_hit(1, 8, 2) == pytest.approx(2.0)
    assert roofline.expected_experts_hit(8, 8, 2) == pytest.approx(8 * (1 - 0.75**8))
    assert roofline.expected_experts_hit(1000, 8, 2) == pytest.approx(8.0)


def test_batch1_decode_reads_active_parameters() -> None:
    args = preset("mixtral-8x7b")
    step = roofline.decode_step_bytes(args, batch=1, context_len=0)
    counts = args.num_parameters()
    # Batch 1 reads every active weight once, except the input embedding table (one row).
    expected = (counts["active"] - counts["embeddings"] // 2 + args.dim) * 2
    assert step.weights == pytest.approx(expected)
    assert counts["total"] == pytest.approx(46.7e9, rel=0.01)
    assert counts["active"] == pytest.approx(12.9e9, rel=0.01)


def test_kv_bytes_grow_with_batch_and_context() -> None:
    args = preset("mixtral-8x7b")
    a = roofline.decode_step_bytes(args, 8, 512)
    b = roofline.decode_step_bytes(args, 16, 512)
    assert b.kv == pytest.approx(2 * a.kv)
    assert a.kv == 8 * 512 * 2 * 32 * 8 * 128 * 2


def test_prefill_flops_dominated_by_active_matmuls() -> None:
    args = preset("mixtral-8x7b")
    f = roofline.prefill_flops(args, 2048)
    active_matmul = 2 * 2048 * (args.num_parameters()["active"] - args.num_parameters()["embeddings"])
    assert active_matmul < f < 1.2 * active_matmul
